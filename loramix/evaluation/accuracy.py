"""Task accuracy by next-token scoring: the label token at the last prompt position, and choice log-likelihood.

For each scored Example the candidates are tokenised as they follow the prompt. Their longest common token
prefix is appended to the prompt (for single-token labels such as " A" / " true" it is empty, which is the
reference implementation's scoring); the *label* prediction is the argmax of the next-token logits over
each candidate's first distinguishing token. The *loglik* prediction is the argmax of each candidate's summed
log-probability (one extra row per candidate only when some candidate is longer than one token).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import Encoder, Example, collate, pad_token_id
from ..errors import LoramixError


@dataclass
class _Row:
    """One sequence to run and the (position, token) log-probabilities to read from it."""

    ids: list[int]
    reads: list[tuple[int, int]]
    result: list[float] = field(default_factory=list)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs) - 1  # every candidate keeps at least one token after the prefix
    i = 0
    while i < n and all(s[i] == seqs[0][i] for s in seqs):
        i += 1
    return i


def _plan(encoder: Encoder, ex: Example, max_len: int) -> tuple[_Row, list[_Row] | None]:
    """The label row, and per-candidate rows when some candidate has more than one token after the prefix."""
    prompt = encoder.prompt_ids(ex)
    cands = [encoder.answer_ids(ex, c) for c in ex.choices]
    if any(not c for c in cands):
        raise LoramixError(f"task {ex.task}: a candidate answer tokenises to nothing ({ex.choices})")
    k = _common_prefix(cands)
    longest = max(len(c) for c in cands)
    prompt = prompt[-max(1, max_len - longest):]  # keep the end of a long prompt: it holds the question
    head = prompt + cands[0][:k]
    label_row = _Row(head, [(len(head) - 1, c[k]) for c in cands])
    if longest == k + 1:
        return label_row, None
    rows = [_Row(prompt + c, [(len(prompt) + j - 1, c[j]) for j in range(k, len(c))]) for c in cands]
    return label_row, rows


@torch.inference_mode()
def _run_rows(model: Any, rows: list[_Row], pad_id: int, batch_size: int, device: torch.device) -> None:
    """Fill each row's ``result`` with log p(token | prefix) at its read positions; batched, right-padded."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        batch = collate([{"input_ids": r.ids} for r in chunk], pad_id)
        # Project only the positions some row reads: the [B, S, V] logits would cost more than a layer.
        keep = sorted({p for r in chunk for p, _ in r.reads})
        column = {p: j for j, p in enumerate(keep)}
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       logits_to_keep=torch.tensor(keep, device=device)).logits  # [B, len(keep), V]
        for b, row in enumerate(chunk):
            pos = torch.tensor([column[p] for p, _ in row.reads], device=logits.device)
            tok = torch.tensor([t for _, t in row.reads], device=logits.device)
            logp = torch.log_softmax(logits[b, pos].float(), dim=-1)  # [n_reads, V]
            row.result = logp[torch.arange(len(pos), device=logp.device), tok].tolist()


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Prediction:
    """One scored example: the label-token and log-likelihood predictions and each candidate's log-likelihood."""

    example: Example
    label_pred: int
    loglik_pred: int
    loglik: list[float]


def predict(model: Any, encoder: Encoder, examples: list[Example], *, batch_size: int = 8,
            max_len: int = 1024) -> list[Prediction]:
    """Predictions for the scored examples (those with choices and a label), in order."""
    scored = [e for e in examples if e.scored]
    if not scored:
        raise LoramixError("no scored examples to evaluate (examples need choices and a label)")
    plans = [_plan(encoder, e, max_len) for e in scored]
    rows = [r for label_row, extra in plans for r in [label_row, *(extra or [])]]
    was_training = model.training
    model.eval()
    try:
        _run_rows(model, rows, pad_token_id(encoder.tokenizer), batch_size, _model_device(model))
    finally:
        model.train(was_training)
    out = []
    for ex, (label_row, extra) in zip(scored, plans):
        ll = label_row.result if extra is None else [sum(r.result) for r in extra]
        out.append(Prediction(ex, _argmax(label_row.result), _argmax(ll), ll))
    return out


def score(model: Any, encoder: Encoder, examples: list[Example], *, batch_size: int = 8,
          max_len: int = 1024) -> dict[str, dict[str, float]]:
    """Per task: ``n``, ``label_acc`` and ``loglik_acc`` (fractions in [0, 1]) over the scored examples."""
    hits: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for p in predict(model, encoder, examples, batch_size=batch_size, max_len=max_len):
        hits[p.example.task].append((p.label_pred == p.example.label, p.loglik_pred == p.example.label))
    return {task: {"n": len(h), "label_acc": sum(a for a, _ in h) / len(h), "loglik_acc": sum(b for _, b in h) / len(h)}
            for task, h in hits.items()}


def with_average(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Add an ``average`` row (unweighted mean over tasks) when there is more than one task."""
    if len(results) < 2:
        return dict(results)
    keys = ("label_acc", "loglik_acc")
    avg = {k: sum(r[k] for r in results.values()) / len(results) for k in keys}
    return {**results, "average": {"n": sum(r["n"] for r in results.values()), **avg}}


def format_table(results: dict[str, dict[str, float]], title: str | None = None) -> str:
    """A fixed-width per-task table of accuracies in percent."""
    width = max([len("task")] + [len(t) for t in results])
    lines = [title] if title else []
    lines.append(f"{'task':<{width}}  {'n':>6}  {'label acc':>9}  {'loglik acc':>10}")
    for task, r in results.items():
        lines.append(f"{task:<{width}}  {int(r['n']):>6}  {100 * r['label_acc']:>8.1f}%  {100 * r['loglik_acc']:>9.1f}%")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    """Write results as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
