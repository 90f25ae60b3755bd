"""Prompt templates: turn an Example's instruction/input into the prompt text, and say what joins prompt and answer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LoramixError

_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

TEMPLATE_NAMES = ("alpaca", "plain", "chat")


@dataclass(frozen=True)
class Template:
    """A named prompt format.

    ``separator`` goes between the prompt and the answer (" " for the plain template, whose prompts end in
    "Answer:"); ``special_tokens`` says whether the tokenizer should add BOS to the prompt (the chat
    template writes its own special tokens).
    """

    name: str
    separator: str
    special_tokens: bool
    tokenizer: Any = None

    def prompt(self, instruction: str, input: str = "") -> str:
        """Render the prompt text (everything before the answer)."""
        if self.name == "alpaca":
            return (_ALPACA_INPUT if input else _ALPACA).format(instruction=instruction, input=input)
        if self.name == "plain":
            return f"{instruction}\n{input}" if input else instruction
        content = f"{instruction}\n\n{input}" if input else instruction
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    def continuation(self, text: str) -> str:
        """The answer text as it follows the prompt."""
        return self.separator + text


def get_template(name: str, tokenizer: Any = None) -> Template:
    """Look up a template by name; ``chat`` needs a tokenizer that has a chat template."""
    if name == "alpaca":
        return Template("alpaca", "", True)
    if name == "plain":
        return Template("plain", " ", True)
    if name == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LoramixError("template 'chat' needs a tokenizer with a chat template; this tokenizer has none "
                               "(use template: alpaca or plain)")
        return Template("chat", "", False, tokenizer)
    raise LoramixError(f"unknown template {name!r} (allowed: {', '.join(TEMPLATE_NAMES)})")
