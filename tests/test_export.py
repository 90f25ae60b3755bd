"""Exported MoE checkpoints against transformers' own MoE classes: same logits, same greedy text, classic key layout."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import loramix
from loramix import LoramixError, MixLoraConfig, cli
from loramix.commands import export as export_command
from loramix.convert.export import architecture_for, export_moe
from loramix.convert.gguf import check_llama_cpp_runs

from conftest import batch, randomize_adapter, tiny_config, tiny_model
from helpers_export import assert_tokenizer_loads_as_declared, mixlora, run_command, saved_base_and_adapter

EXPECTED_CLASS = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM",
                  "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


def load_export(path):
    exported, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return exported.eval(), info


def assert_same_model(model, exported, *, length=12, seed=0):
    """Logits within 1e-4 (fp32) on the real tokens of a padded random batch, and the same greedy tokens."""
    ids, mask = batch(seed=seed, length=length)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = exported(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours - theirs)[real].abs().max().item() <= 1e-4
    prompt, prompt_mask = ids[1:], mask[1:]
    ours = model.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=10, do_sample=False)
    theirs = exported.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)


def keys_and_shapes(path):
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


@pytest.mark.parametrize("model_type, base_kw", [
    ("llama", {}),
    ("mistral", {"sliding_window": 5}),                   # the window bites: sequences are 12 long
    ("qwen2", {}),                                        # q/k/v biases
    ("qwen3", {"head_dim": 12, "tie_word_embeddings": False}),  # head_dim != hidden / heads, q/k norms
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),  # per-layer windows
    ("qwen3", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0}),  # all layers slide
    ("llama", {"is_llama_config": True, "rope_interleaved": False,  # extras some hub configs carry (SmolLM2)
               "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                   "rope_theta": 500000.0}, "rms_norm_eps": 1e-3}),
])
def test_export_equals_mixlora_model(tmp_path, model_type, base_kw):
    model = mixlora(model_type, base_kw=base_kw)
    summary = export_moe(model, tmp_path)
    exported, info = load_export(tmp_path)
    assert type(exported).__name__ == EXPECTED_CLASS[model_type] == summary.architecture
    # Qwen2-MoE's shared expert is switched off by width 0; its empty weights are the only ones not in the file.
    assert all(".shared_expert." in k and exported.get_parameter(k).numel() == 0 for k in info["missing_keys"])
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_model(model, exported)


def test_mixtral_checkpoint_has_the_classic_per_expert_layout(tmp_path):
    """The tensor names vLLM's and llama.cpp's Mixtral loaders read (as in mistralai/Mixtral-8x7B-v0.1)."""
    model = mixlora("llama", num_experts=3, base_kw={"tie_word_embeddings": True})
    export_moe(model, tmp_path)
    shapes = keys_and_shapes(tmp_path)
    hidden, ffn = 32, 48
    for layer in range(2):
        block = f"model.layers.{layer}.block_sparse_moe"
        assert shapes[f"{block}.gate.weight"] == (3, hidden)
        for e in range(3):
            assert shapes[f"{block}.experts.{e}.w1.weight"] == (ffn, hidden)   # gate_proj
            assert shapes[f"{block}.experts.{e}.w2.weight"] == (hidden, ffn)   # down_proj
            assert shapes[f"{block}.experts.{e}.w3.weight"] == (ffn, hidden)   # up_proj
        assert f"model.layers.{layer}.self_attn.q_proj.weight" in shapes
    assert "lm_head.weight" not in shapes  # tied to the embeddings, as in the base
    assert not any("lora" in k or "router" in k or ".mlp." in k for k in shapes)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (3, 2, ffn)


# llama.cpp's convert_hf_to_gguf.py reads MixtralForCausalLM with its LLaMA converter (stacking the per-expert
# tensors into one per projection) and the Qwen MoE classes with their own.
GGUF_ARCH = {"MixtralForCausalLM": "LLAMA", "Qwen2MoeForCausalLM": "QWEN2MOE", "Qwen3MoeForCausalLM": "QWEN3MOE"}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_every_tensor_has_a_gguf_name(tmp_path, model_type):
    """Each written tensor (expert index dropped, as llama.cpp's converter stacks experts) maps to a GGUF tensor."""
    gguf = pytest.importorskip("gguf", reason="the optional gguf package (pip install loramix[gguf]) is absent")
    summary = export_moe(mixlora(model_type), tmp_path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[GGUF_ARCH[summary.architecture]], 2)
    for key in keys_and_shapes(tmp_path):
        stacked = re.sub(r"\.experts\.\d+\.", ".experts.", key)
        assert names.get_name(stacked, try_suffixes=(".weight", ".bias")), key


def test_expert_weights_are_the_formula(tmp_path):
    """Expert e's w3 is exactly W_up + s B_e A_e (independent of the export's own helpers)."""
    model = mixlora("llama", target_modules=["q_proj", "up_proj"], use_rslora=True)
    export_moe(model, tmp_path)
    ffn = model.moe_layers()[1]
    loras = ffn.experts["up_proj"]
    s = 8 / 4 ** 0.5
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        for e in range(4):
            want = ffn.base_ffn.up_proj.weight + s * loras.lora_B[e] @ loras.lora_A[e]
            torch.testing.assert_close(fh.get_tensor(f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"),
                                       want, rtol=0, atol=1e-6)
            torch.testing.assert_close(fh.get_tensor(f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"),
                                       ffn.base_ffn.gate_proj.weight, rtol=0, atol=0)


def test_partial_targets_expert_overrides_and_top1(tmp_path):
    model = mixlora("mistral", target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], top_k=1,
                    expert_lora={"r": 2, "lora_alpha": 6})
    export_moe(model, tmp_path)
    exported, _ = load_export(tmp_path)
    assert_same_model(model, exported, seed=3)


def test_size_cost_is_e_copies_of_the_ffn(tmp_path):
    model = mixlora("llama", num_experts=5)
    summary = export_moe(model, tmp_path)
    hidden, ffn_params, layers = 32, 3 * 32 * 48, 2
    base = sum(p.numel() for p in tiny_model("llama").parameters())
    assert summary.base_params == base
    assert summary.num_params == base + layers * ((5 - 1) * ffn_params + 5 * hidden)
    assert summary.num_bytes == 4 * summary.num_params
    assert "5 copies of the FFN" in summary.report()


def test_bfloat16_export_and_sharding(tmp_path):
    model = mixlora("llama")
    summary = export_moe(model, tmp_path, dtype=torch.bfloat16, max_shard_size="20kB")
    assert len(summary.files) > 1 and summary.num_bytes == 2 * summary.num_params
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == list(summary.files)
    exported, info = load_export(tmp_path)
    assert not info["missing_keys"] and exported.dtype == torch.bfloat16
    ids, mask = batch(length=12)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = exported.float()(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs)[mask.bool()].abs().max().item() < 0.1  # bf16 weights, fp32 compute


def test_dora_adapter_exports_exactly(tmp_path):
    model = mixlora("llama", use_dora=True)
    with torch.no_grad():  # magnitudes away from their init, so the rescaling matters
        for name, param in model.trainable_parameters():
            if "lora_magnitude" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=torch.Generator().manual_seed(5)))
    export_moe(model, tmp_path)
    exported, _ = load_export(tmp_path)
    assert_same_model(model, exported)


# ---- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("routing, extra", [("top_p", {"top_p": 0.5}), ("switch", {"top_k": 1})])
def test_refuses_top_p_and_switch_routing(tmp_path, routing, extra):
    cfg = {"routing": routing, **extra}
    if routing == "top_p":
        cfg["top_k"] = None
    model = mixlora("llama", **cfg)
    with pytest.raises(LoramixError, match=f"{routing.replace('_', '-')} routing"):
        export_moe(model, tmp_path)


@pytest.mark.parametrize("model_type, base_kw, to, message", [
    ("gemma", {}, None, "no standard MoE architecture expresses a 'gemma' base"),
    ("llama", {"attention_bias": True}, None, "attention_bias=True"),
    ("llama", {"mlp_bias": True}, None, "has a bias"),
    ("qwen2", {}, "mixtral", "cannot be exported to mixtral"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, None,
     "mixes sliding-window and full-attention layers"),
])
def test_refuses_what_the_target_cannot_express(tmp_path, model_type, base_kw, to, message):
    model = mixlora(model_type, base_kw=base_kw)
    with pytest.raises(LoramixError, match=message):
        export_moe(model, tmp_path, architecture=to)
    assert not any(tmp_path.iterdir())


def test_gguf_base_quantization_config_is_dropped_and_quantised_bases_refused(tmp_path):
    model = mixlora("llama")
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    export_moe(model, tmp_path / "moe")  # transformers dequantises GGUF weights on load: real numbers
    assert "quantization_config" not in json.loads((tmp_path / "moe" / "config.json").read_text())
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}  # bitsandbytes: tests/test_quantized.py
    with pytest.raises(LoramixError, match=r"loaded quantised \(gptq\), which loramix cannot dequantise"):
        export_moe(model, tmp_path / "other")


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LoramixError, match="not empty"):
        export_moe(mixlora("llama"), tmp_path)


# ---- the command --------------------------------------------------------------------------------------------
def test_export_command_on_a_saved_model_copies_the_tokenizer(tmp_path, capsys):
    base_dir, adapter_dir, model = saved_base_and_adapter(tmp_path)
    out = tmp_path / "moe"
    assert run_command(export_command, ["export", "--model", str(base_dir), "--adapter", str(adapter_dir),
                                        "--to", "mixtral", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MixtralForCausalLM" in printed and "3 copies of the FFN" in printed and "tokenizer.json" in printed
    argv = ["export", "--model", str(base_dir), "--adapter", str(adapter_dir), str(out)]
    assert cli.main(argv) == 2  # the real command line: one error line, nothing overwritten
    assert capsys.readouterr().err.strip().endswith("is not empty (--overwrite / overwrite=True replaces it)")
    assert cli.main(argv + ["--overwrite"]) == 0
    assert_tokenizer_loads_as_declared(out, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    exported, _ = load_export(out)
    ids = tokenizer(["a mixture of experts"], return_tensors="pt")
    with torch.no_grad():
        assert (model(**ids).logits - exported(**ids).logits).abs().max().item() <= 1e-4


def test_a_tokenizer_object_is_saved_under_a_portable_class(tmp_path):
    base_dir, adapter_dir, _ = saved_base_and_adapter(tmp_path)  # its tokenizer: transformers 5's TokenizersBackend
    model, _ = loramix.MixLoraModelForCausalLM.from_pretrained(str(adapter_dir))
    export_moe(model, tmp_path / "moe", tokenizer=AutoTokenizer.from_pretrained(base_dir))
    assert_tokenizer_loads_as_declared(tmp_path / "moe", base_dir)


def test_stories260k_export_through_the_command(tmp_path, stories_path, capsys):
    torch.manual_seed(0)  # the A matrices' init
    base = AutoModelForCausalLM.from_pretrained(stories_path)
    model = loramix.get_mixlora_model(base, MixLoraConfig(r=8, num_experts=4, top_k=2, lora_dropout=0.0))
    randomize_adapter(model, seed=7, std=0.05)  # ||s B A|| about 0.17 ||W||: a large fine-tuning update
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "moe"
    run_command(export_command, ["export", "--model", str(stories_path), "--adapter", str(tmp_path / "adapter"),
                                 str(out)])
    assert "tokenizer files: none" in capsys.readouterr().out  # stories260K has no HF tokenizer
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    exported, info = load_export(out)
    assert type(exported).__name__ == "MixtralForCausalLM" and not info["missing_keys"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits
                - exported(input_ids=ids, attention_mask=mask).logits).abs().max().item() <= 1e-4
    prompt = torch.tensor([[1, 403, 407, 262]])  # BOS and a few story tokens
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=20, do_sample=False),
                       exported.generate(input_ids=prompt, max_new_tokens=20, do_sample=False))


# ---- --to gguf ----------------------------------------------------------------------------------------------
def test_gguf_export_checks_the_converter_and_out_before_loading(tmp_path, capsys):
    argv = ["export", "--model", str(tmp_path / "no-base"), "--adapter", str(tmp_path / "no-adapter"), "--to", "gguf"]
    cases = [([str(tmp_path / "m.gguf")], "--to gguf needs llama.cpp's convert_hf_to_gguf.py: pass --converter"),
             (["--converter", str(tmp_path), str(tmp_path / "m.gguf")], "no convert_hf_to_gguf.py there"),
             (["--converter", str(tmp_path), str(tmp_path / "m")], "OUT must end in .gguf"),
             (["--dtype", "float16", str(tmp_path / "m.gguf")], "with --to gguf use --outtype")]
    for extra, message in cases:
        assert cli.main(argv + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_export_refuses_architectures_llama_cpp_cannot_run():
    for base in ("llama", "mistral", "qwen3"):
        arch = architecture_for(base)
        check_llama_cpp_runs(arch.model_type, arch.architecture)
    arch = architecture_for("qwen2")  # Qwen2-MoE without its shared expert
    with pytest.raises(LoramixError, match="llama.cpp cannot run"):
        check_llama_cpp_runs(arch.model_type, arch.architecture)


def llama_cpp_converter() -> str:
    """A folder with llama.cpp's convert_hf_to_gguf.py: $LORAMIX_LLAMA_CPP, or the serve check's unpacked sdist."""
    serve_check = Path(__file__).resolve().parents[1] / ".serve-check" / "src" / "llama_cpp_python-0.3.36"
    for folder in (os.environ.get("LORAMIX_LLAMA_CPP"), serve_check / "vendor" / "llama.cpp"):
        if folder and (Path(folder) / "convert_hf_to_gguf.py").is_file():
            return str(folder)
    pytest.skip("llama.cpp's converter is absent: set LORAMIX_LLAMA_CPP to a llama.cpp folder, or run "
                "benchmarks/serve_check.sh (it unpacks one into .serve-check/)")


def sentencepiece_base(folder: Path, spm) -> Path:
    """A tiny LLaMA whose tokenizer is a freshly trained sentencepiece model (llama.cpp's converter reads
    ``tokenizer.model`` directly)."""
    corpus = folder / "corpus.txt"
    folder.mkdir()
    corpus.write_text("\n".join(f"expert {i} routes token {i * 7 % 13} to layer {i % 3}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    (folder / "sp.model").rename(folder / "tokenizer.model")
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=60, pad_token_id=None, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_gguf_export_through_llama_cpps_converter(tmp_path):
    """``--to gguf`` with the real converter: llama.cpp's MoE tensors hold the experts' merged weights."""
    converter = llama_cpp_converter()
    spm = pytest.importorskip("sentencepiece", reason="llama.cpp's converter needs sentencepiece")
    gguf = pytest.importorskip("gguf", reason="the optional gguf package (pip install loramix[gguf]) is absent")
    base = sentencepiece_base(tmp_path / "base", spm)
    model = loramix.get_mixlora_model(AutoModelForCausalLM.from_pretrained(base),
                                      MixLoraConfig(r=4, num_experts=3, top_k=2, lora_dropout=0.0))
    randomize_adapter(model, std=0.3)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "moe.gguf"
    assert run_command(export_command, ["export", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                                        "--to", "gguf", "--outtype", "f32", "--converter", converter, str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".loramix-gguf")] == []  # the HF folder is gone
    reader = gguf.GGUFReader(str(out))
    field = lambda key: reader.fields[key].contents()
    assert field("general.architecture") == "llama"
    assert (field("llama.expert_count"), field("llama.expert_used_count")) == (3, 2)
    tensors = {t.name: t.data for t in reader.tensors}
    export_moe(model, tmp_path / "hf")  # the checkpoint the converter read, kept this time
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as fh:
        for layer in range(2):
            moe = f"model.layers.{layer}.block_sparse_moe"
            assert torch.equal(torch.from_numpy(tensors[f"blk.{layer}.ffn_gate_inp.weight"].copy()),
                               fh.get_tensor(f"{moe}.gate.weight"))
            for ours, theirs in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
                stacked = torch.stack([fh.get_tensor(f"{moe}.experts.{e}.{ours}.weight") for e in range(3)])
                assert torch.equal(torch.from_numpy(tensors[f"blk.{layer}.{theirs}.weight"].copy()), stacked)
