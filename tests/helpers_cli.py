"""Test helpers: a byte-level tokenizer built in code and tiny LLaMA models saved as local folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
COMMONSENSE = SHARED / "data" / "commonsense"


def byte_tokenizer():
    """A byte-level tokenizer (ids 0-3 special: <unk>, <s>, </s>, <pad>; bytes at 4-259) that adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({ch: 4 + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama_dir(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """Save a randomly initialised tiny LlamaForCausalLM and the byte tokenizer into ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=260, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def shared_or_skip(path: Path):
    """Skip the calling test with a clear reason when ``../shared`` (or the given part of it) is absent."""
    import pytest

    if not os.path.exists(path):
        pytest.skip(f"{path} not present (tests read real data and models from ../shared beside the repo)")
    return path


def tiny_run_config(model_dir: Path, data: Path, out: Path, **train) -> dict:
    """A run-config dict for a tiny MixLoRA training run on ``data`` (a JSONL file)."""
    return {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"type": "mixlora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "num_experts": 4, "top_k": 2},
        "data": {"cutoff_len": 96, "datasets": [{"path": str(data), "task": "toy"}],
                 "eval": [{"path": str(data), "task": "toy"}]},
        "train": {"output_dir": str(out), "max_steps": 4, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                  "learning_rate": 5e-3, "warmup_steps": 1, "seed": 7, "progress_bar": False, **train},
    }


def toy_classification(path: Path, n: int = 24) -> Path:
    """A tiny two-label classification JSONL the byte tokenizer handles quickly."""
    return write_jsonl(path, [{"text": f"n{i}", "label": "even" if i % 2 == 0 else "odd"} for i in range(n)])


def adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
