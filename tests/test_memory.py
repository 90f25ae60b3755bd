"""The per-GPU memory arithmetic: parameter counts against real models, saved activations against a real forward."""
from __future__ import annotations

import pytest
import torch

from loramix import MixLoraConfig, get_mixlora_model
from loramix.io.base_model import load_base_model
from loramix.runconfig import ModelSpec
from loramix.tools.bench import saved_bytes
from loramix.tools.memory import (LLAMA2_7B, LLAMA2_70B, LLAMA3_8B, PLANNED_DISPATCHES, Shape, adapter_parameters,
                                  base_parameters, estimate, frozen_weight_bytes, layer_parameters,
                                  saved_bytes_per_token)

SMALL = Shape(hidden=96, intermediate=160, layers=2, heads=3, vocab=50)
KW = dict(r=8, experts=4, top_k=2)


def _model(s: Shape, *, r: int, experts: int, top_k: int, dropout: float, dtype=torch.float32,
           quantization: str | None = None, folder=None):
    """(base, MixLoRA model) on a random LLaMA of shape ``s``; ``quantization``: the base saved in ``folder``
    and loaded back through bitsandbytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).to(dtype)
    if quantization:
        base.save_pretrained(folder)
        spec = ModelSpec(name_or_path=str(folder), dtype=str(dtype).removeprefix("torch."), quantization=quantization)
        base = load_base_model(spec, "cpu")
    return base, get_mixlora_model(base, MixLoraConfig(r=r, lora_alpha=2 * r, num_experts=experts, top_k=top_k,
                                                       lora_dropout=dropout))


def test_parameter_counts_by_hand_and_against_real_models():
    # by hand, per layer: 4*96*96 + 3*96*160 + 2*96 = 36864 + 46080 + 192 = 83136; x2 + 2*50*96 + 96 = 175968
    assert base_parameters(SMALL) == 175968
    # per layer: attention 4*4*(96+96) = 3072, experts 3*3*4*(96+160) = 9216, router 3*96 = 288 -> 12576, x2
    assert adapter_parameters(SMALL, r=4, experts=3) == 25152
    base, model = _model(SMALL, r=4, experts=3, top_k=2, dropout=0.0)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 25152 and total - trainable == 175968
    assert base_parameters(LLAMA2_7B) == 6_738_415_616  # the published LLaMA-2-7B count
    assert base_parameters(LLAMA2_70B) == 68_976_648_192  # grouped-query attention: k, v are D x D/8
    assert base_parameters(LLAMA3_8B) == 8_030_261_248


def _per_layer(tokens: torch.Tensor, folder, *, dropout: float, checkpointing: bool = False,
               quantization: str | None = None, dispatch: str = "grouped") -> int:
    """What one more decoder layer adds to what autograd keeps (``saved_bytes``) in a bf16 training forward."""
    measured = []
    for layers in (2, 3):
        _, model = _model(Shape(**{**SMALL.__dict__, "layers": layers}), dropout=dropout, dtype=torch.bfloat16,
                          quantization=quantization, folder=folder / str(layers), **KW)
        model.set_dispatch(dispatch)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        measured.append(saved_bytes(model, tokens))
    return measured[1] - measured[0]


@pytest.mark.parametrize("dispatch", PLANNED_DISPATCHES)
@pytest.mark.parametrize("dropout,checkpointing", [(0.1, False), (0.0, False), (0.1, True)])
def test_saved_activations_per_layer_match_a_real_bf16_forward(dropout, checkpointing, dispatch, tmp_path):
    """One more decoder layer adds ``saved_bytes_per_token * tokens`` to what autograd keeps: exactly for the
    paths as written; 5 % leaves room for small later changes and still tells the two paths apart."""
    tokens = torch.randint(3, SMALL.vocab, (2, 24))
    measured = _per_layer(tokens, tmp_path, dropout=dropout, checkpointing=checkpointing, dispatch=dispatch)
    expected = saved_bytes_per_token(SMALL, dropout=dropout > 0, checkpointing=checkpointing, dispatch=dispatch,
                                     **KW) * tokens.numel()
    assert measured == pytest.approx(expected, rel=0.05), (
        "the forward keeps other tensors now: update loramix/memory.py saved_bytes_per_token and docs/distributed.md")


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantised_base_keeps_exactly_what_the_planner_adds(quantization, tmp_path):
    """A 4-bit base keeps what a bf16 one keeps (its matmul saves only the packed weight); an 8-bit one also
    the matmul inputs nothing else keeps, on its autograd node: counted exactly."""
    pytest.importorskip("bitsandbytes", reason="quantised bases need bitsandbytes (loramix[quant])")
    tokens = torch.randint(3, SMALL.vocab, (2, 24))
    extra = (_per_layer(tokens, tmp_path / "q", dropout=0.1, quantization=quantization)
             - _per_layer(tokens, tmp_path / "plain", dropout=0.1))
    per_token = (saved_bytes_per_token(SMALL, dropout=True, quantization=quantization, dispatch="grouped", **KW)
                 - saved_bytes_per_token(SMALL, dropout=True, dispatch="grouped", **KW))
    assert extra == per_token * tokens.numel()


def test_estimate_adds_up():
    e = estimate(SMALL, batch=2, seq=10, r=4, experts=3, processes=2)
    n = 25152
    assert (e.adapter, e.gradients, e.optimizer, e.ddp_buckets) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert e.weights == 2 * 175968 and e.logits == 4 * 20 * 50
    assert e.activations == 2 * 20 * saved_bytes_per_token(SMALL, r=4, experts=3, top_k=2, dropout=True)
    ckpt = estimate(SMALL, batch=2, seq=10, r=4, experts=3, checkpointing=True)
    per = saved_bytes_per_token(SMALL, r=4, experts=3, top_k=2, dropout=True, checkpointing=True)
    assert ckpt.ddp_buckets == 0 and ckpt.activations == 20 * (2 * per) + e.activations // 2
    assert e.total == e.weights + 20 * n + e.activations + e.logits
    nf4 = estimate(SMALL, batch=2, seq=10, r=4, experts=3, quantization="nf4", double_quant=True)
    assert nf4.weights == frozen_weight_bytes(SMALL, quantization="nf4", double_quant=True) < e.weights
    assert nf4.dequantized == 2 * 96 * 160  # the largest projection (gate, up, down) in 16-bit
    assert nf4.total == e.total - e.ddp_buckets - e.weights + nf4.weights + nf4.dequantized


def test_fsdp_estimate_keeps_a_shard_of_each_state_and_gathers_the_root_and_two_layers():
    base, _ = _model(SMALL, r=4, experts=3, top_k=2, dropout=0.0)
    layer = sum(p.numel() for p in base.model.layers[0].parameters() if not p.requires_grad)  # the frozen base's
    assert layer_parameters(SMALL) == layer == 83136
    n, kw = 25152, {"batch": 2, "seq": 10, "r": 4, "experts": 3, "processes": 4}
    ddp, fsdp = estimate(SMALL, **kw), estimate(SMALL, **kw, fsdp=True)
    assert (fsdp.weights, fsdp.adapter, fsdp.gradients, fsdp.optimizer) == (2 * 175968 // 4, n, n, 2 * n)
    root = sum(p.numel() for p in base.parameters() if not p.requires_grad) - 2 * layer  # embeddings, head, norm
    assert fsdp.fsdp_gathered == 2 * (root + 2 * layer) + 4 * n  # SMALL has 2 layers: both layers' adapters
    assert fsdp.ddp_buckets == 0 and fsdp.activations == ddp.activations and fsdp.logits == ddp.logits
    one = {**kw, "processes": 1}
    assert estimate(SMALL, **one, fsdp=True) == estimate(SMALL, **one)  # one process: nothing to shard
