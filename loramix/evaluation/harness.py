"""lm-evaluation-harness on a base model with a loramix adapter, without exporting it (docs/lm-eval.md).

Importing this module registers the lm-eval model type ``loramix``: lm-eval's own Hugging Face model (``HFLM``)
on the base model it loads, with a MixLoRA (or PEFT LoRA) adapter folder attached, ``model_args=
"pretrained=BASE,adapter=DIR"``. ``python -m loramix.evaluation.harness`` is lm-eval's command line with that
type registered; ``loramix eval --harness lm-eval`` (commands/evaluate.py) runs :func:`evaluate`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from ..config import reject_unknown
from ..errors import LoramixError
from ..loading import adapter_kind, attach_adapter

try:
    from lm_eval import simple_evaluate
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table
except ImportError:  # the optional extra
    raise LoramixError("lm-evaluation-harness is not installed: pip install 'loramix[eval]' "
                       "(lm-eval>=0.4.13)") from None


@register_model("loramix")
class MixLoraLM(HFLM):
    """lm-eval's ``hf`` model with ``adapter`` (a MixLoRA or PEFT LoRA adapter folder; none: the bare base)
    attached to the base model ``pretrained`` once HFLM has loaded it; every other argument is HFLM's."""

    def __init__(self, pretrained: str, adapter: str | None = None, **kwargs: Any) -> None:
        for name in ("peft", "delta"):
            if kwargs.get(name):
                raise LoramixError(f"lm-eval model 'loramix': give the adapter as adapter=DIR, not {name}=")
        if not isinstance(pretrained, str):
            raise LoramixError("lm-eval model 'loramix' loads the base itself: pretrained= must be a model name "
                               "or folder (lm-eval's 'hf' model takes a loaded model)")
        if adapter is not None:
            adapter_kind(adapter)  # a missing or foreign folder fails before the base model loads
        self._adapter = adapter
        super().__init__(pretrained=pretrained, **kwargs)

    def _create_model(self, pretrained: str, **kwargs: Any) -> None:
        super()._create_model(pretrained, **kwargs)
        self._model = attach_adapter(self._model, self._adapter)


def task_manager(tasks: list[str], include_path: str | None = None) -> TaskManager:
    """lm-eval's task index for ``tasks``: the YAML tasks under ``include_path`` alone when they hold every one
    of them (lm-eval's built-in index takes seconds to build), else those and the built-in tasks. An unknown
    task name is an error naming it."""
    if include_path is not None and not os.path.isdir(include_path):
        raise LoramixError(f"--include-path {include_path}: no such folder of lm-eval task YAML files")
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path)
    for name in tasks:
        reject_unknown(name, manager.all_tasks, "lm-eval task")
    return manager


def evaluate(model: Any, tokenizer: Any, manager: TaskManager, tasks: list[str], *, batch_size: int = 8,
             num_fewshot: int | None = None, limit: int | None = None) -> dict:
    """lm-eval's ``simple_evaluate`` of ``tasks`` on a loaded model (adapter attached, on its device): the
    results dict lm-eval writes, per-item ``samples`` included."""
    hf_logger = logging.getLogger(HFLM.__module__)
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its warning about a loaded model ("arguments may be ignored") is not ours
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_logger.setLevel(level)
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=True)


def format_table(results: dict) -> str:
    """lm-eval's own results table (metrics per task, with standard errors)."""
    return make_table(results)


def write_results(path: str, adapter: str | None, results: dict) -> None:
    """The adapter, lm-eval's metrics per task and its per-item samples (prompts, log-likelihoods), as JSON."""
    payload = {"adapter": adapter, **{key: results[key] for key in ("results", "n-shot", "n-samples", "samples")}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=handle_non_serializable)
        f.write("\n")


def main() -> None:
    """lm-eval's command line (``lm_eval run ...``) with the ``loramix`` model type registered."""
    cli_evaluate()


if __name__ == "__main__":
    main()
