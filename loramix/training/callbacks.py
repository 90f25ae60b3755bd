"""transformers' Trainer with a MixLoraModel: the callback that logs the router loss (docs/trainers.md).

The Trainer logs ``loss`` only (for a MixLoraModel: cross-entropy plus the router loss); TRL's SFTTrainer logs
``aux_loss`` itself. ``Trainer(..., callbacks=[RouterLossCallback()])`` adds the same ``aux_loss`` entry.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback


class RouterLossCallback(TrainerCallback):
    """Adds ``aux_loss`` to each training log line: the router loss averaged over the training forwards
    (micro-batches, all processes) since the previous line.

    The entry goes into ``trainer.state.log_history`` and to the callbacks after this one (the console);
    the integrations named in ``report_to`` run before user callbacks, so they see ``loss`` only.
    """

    def __init__(self) -> None:
        self._hook: Any = None
        self._total: torch.Tensor | None = None  # [2]: summed router loss, number of forwards

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_hook(self._record)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        aux = getattr(output, "aux_loss", None)
        if module.training and aux is not None:
            entry = torch.stack([aux.detach().float(), torch.ones((), device=aux.device)])
            self._total = entry if self._total is None else self._total + entry

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluation and end-of-training summaries
            return
        total = self._total if self._total is not None else torch.zeros(2)
        total = total.to(args.device)
        if dist.is_available() and dist.is_initialized():  # every process logs at the same steps
            dist.all_reduce(total)
        self._total = None
        if total[1] > 0:
            logs["aux_loss"] = state.log_history[-1]["aux_loss"] = float(total[0] / total[1])
