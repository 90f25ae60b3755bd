"""Helpers for the export and merge tests: randomised MixLoRA models, saved adapters, running one subcommand."""
from __future__ import annotations

import argparse
import json

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import loramix
from loramix import MixLoraConfig

from conftest import randomize_adapter, tiny_model
from helpers_cli import tiny_llama_dir


def mixlora(model_type="llama", *, seed=0, base_kw=None, **cfg):
    """A tiny ``model_type`` with a MixLoRA adapter whose B matrices and routers are random (eval mode)."""
    defaults = dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2)
    model = loramix.get_mixlora_model(tiny_model(model_type, seed=seed, **(base_kw or {})),
                                      MixLoraConfig(**{**defaults, **cfg}))
    randomize_adapter(model, seed=seed + 1, std=0.3)
    return model.eval()


def saved_base_and_adapter(tmp_path):
    """(base folder with a tokenizer, adapter folder, the MixLoRA model) for the command tests."""
    base_dir = tiny_llama_dir(tmp_path / "base")
    model = loramix.get_mixlora_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                      MixLoraConfig(r=4, num_experts=3, top_k=2, lora_dropout=0.0))
    randomize_adapter(model, std=0.3)
    model.save_pretrained(tmp_path / "adapter")
    return base_dir, tmp_path / "adapter", model.eval()


def run_command(module, argv):
    """Parse ``argv`` with only ``module``'s subcommand registered and run it."""
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.run(args)


def assert_tokenizer_loads_as_declared(folder, reference_folder):
    """The tokenizer written into ``folder`` declares a class transformers 4 also has (not transformers 5's
    ``TokenizersBackend``), loads under that very class, and encodes like the tokenizer it came from."""
    declared = json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert declared == "PreTrainedTokenizerFast"
    tokenizer = getattr(transformers, declared).from_pretrained(folder)
    text = "a mixture of experts </s>"
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(reference_folder)(text)["input_ids"]
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
