"""Datasets, prompt templates, tokenisation with loss masks, and the task registry."""
from .encoding import IGNORE_INDEX, Encoder, collate, pad_token_id
from .example import Example
from .sources import load_examples, load_mixture
from .tasks import TASKS, builtin_task, canonical_task_name
from .templates import TEMPLATE_NAMES, get_template

__all__ = ["IGNORE_INDEX", "Encoder", "Example", "TASKS", "TEMPLATE_NAMES", "builtin_task", "canonical_task_name",
           "collate", "get_template", "load_examples", "load_mixture", "pad_token_id"]
