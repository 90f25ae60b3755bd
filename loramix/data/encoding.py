"""Tokenisation: prompts and answers to token ids, loss masks, and right-padded batches."""
from __future__ import annotations

from typing import Any

import torch

from .example import Example
from .templates import Template, get_template

IGNORE_INDEX = -100


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS, else UNK, else 0."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


class Encoder:
    """Renders Examples with their templates and tokenises them.

    Prompt and answer are tokenised separately (prompt with the tokenizer's special tokens, e.g. BOS), so
    the prompt tokens are the same in training, scoring and generation.
    """

    def __init__(self, tokenizer: Any, *, cutoff_len: int = 256, train_on_inputs: bool = False,
                 add_eos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.cutoff_len = cutoff_len
        self.train_on_inputs = train_on_inputs
        self.add_eos = add_eos and tokenizer.eos_token_id is not None
        self._templates: dict[str, Template] = {}

    def template(self, name: str) -> Template:
        if name not in self._templates:
            self._templates[name] = get_template(name, self.tokenizer)
        return self._templates[name]

    def prompt_text(self, ex: Example) -> str:
        return self.template(ex.template).prompt(ex.instruction, ex.input)

    def prompt_ids(self, ex: Example) -> list[int]:
        template = self.template(ex.template)
        text = template.prompt(ex.instruction, ex.input)
        return list(self.tokenizer(text, add_special_tokens=template.special_tokens)["input_ids"])

    def answer_ids(self, ex: Example, text: str) -> list[int]:
        """Token ids of an answer (``output`` or a choice) as it follows the prompt, without special tokens."""
        cont = self.template(ex.template).continuation(text)
        return list(self.tokenizer(cont, add_special_tokens=False)["input_ids"])

    def encode_train(self, ex: Example) -> dict[str, list[int]]:
        """``input_ids`` = prompt + answer (+ EOS), truncated to ``cutoff_len``; ``labels`` masks the prompt
        with -100 unless ``train_on_inputs``."""
        prompt = self.prompt_ids(ex)
        answer = self.answer_ids(ex, ex.output) + ([self.tokenizer.eos_token_id] if self.add_eos else [])
        ids = (prompt + answer)[:self.cutoff_len]
        labels = ids if self.train_on_inputs else [IGNORE_INDEX] * len(prompt) + answer
        return {"input_ids": ids, "labels": list(labels[:self.cutoff_len])}


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of {input_ids, labels?} to ``[B, S]`` tensors with an attention mask (pads: label -100)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        if "labels" in f:
            labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if any("labels" in f for f in features):
        batch["labels"] = labels
    return batch
