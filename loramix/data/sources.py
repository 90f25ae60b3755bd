"""Turn a dataset entry of the run config into Examples: format detection, parsing, multi-task mixing."""
from __future__ import annotations

import dataclasses
import os
import random
import re

from ..errors import LoramixError
from ..runconfig import DatasetSpec
from .example import Example
from .readers import Record, field, read_hub_records, read_json_records, read_tsv_records
from .tasks import TASKS, builtin_task, canonical_task_name, parse_commonsense

FORMATS = ("auto", "instruction", "commonsense", "classification", "tsv", "reference")
_LETTERS = "ABCDEFGHIJ"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SPLIT_NAMES = {"train", "test", "dev", "val", "valid", "validation"}


def default_task_name(path: str) -> str:
    """A task name from a file path: the LLM-Adapters folder ("ARC-Easy/test.json" -> "arc-e") or the file stem."""
    parent = canonical_task_name(os.path.basename(os.path.dirname(os.path.abspath(path))))
    stem = canonical_task_name(os.path.splitext(os.path.basename(path))[0])
    return parent if parent in TASKS or stem in _SPLIT_NAMES else stem


def _detect(keys: set[str], task: str | None, where: str) -> str:
    if {"instruction", "output", "answer"} <= keys:
        return "commonsense"
    if task and canonical_task_name(task) in TASKS and set(TASKS[canonical_task_name(task)].schema_keys) <= keys:
        return "reference"
    if "instruction" in keys:
        return "instruction"
    if keys & {"text", "question", "sentence"} and "label" in keys:
        return "classification"
    raise LoramixError(f"{where}: cannot tell the data format from the fields {sorted(keys)}; set 'format' "
                       f"(one of {', '.join(FORMATS[1:])})")


def _reference_task(keys: set[str], spec: DatasetSpec, where: str) -> str:
    if spec.task:
        return builtin_task(spec.task).name
    matches = [t.name for t in TASKS.values() if set(t.schema_keys) <= keys]
    if len(matches) != 1:
        raise LoramixError(f"{where}: format 'reference' needs 'task' set to one of {', '.join(TASKS)}")
    return matches[0]


def _instruction(rec: Record, where: str, task: str) -> Example:
    return Example(instruction=field(rec, "instruction", where), input=str(rec.get("input") or ""),
                   output=field(rec, "output", where), task=task)


def _classification_prompt(spec: DatasetSpec, text: str, options: list[str] | None, labels: list[str]) -> str:
    head = spec.instruction if spec.instruction is not None else \
        (None if options else f"Choose one of: {', '.join(labels)}.")
    body = text + "".join(f"\n({_LETTERS[i]}) {o}" for i, o in enumerate(options or []))
    return (f"{head}\n" if head else "") + body + "\nAnswer:"


def _label_word(raw: object, spec: DatasetSpec, where: str) -> str:
    """The label word of a row: itself, or with ``label_names`` one of them (given as the word or its index)."""
    word = str(raw).strip()
    if spec.label_names is None:
        return word
    names = [str(x) for x in spec.label_names]
    if word in names:
        return word
    try:
        return names[int(word)]
    except (ValueError, IndexError):
        raise LoramixError(f"{where}: label {raw!r} is neither one of label_names {names} nor an index into "
                           f"them") from None


def _classification(rows: list[tuple[str, str, object, list | None]], spec: DatasetSpec, task: str) -> list[Example]:
    """Rows of (where, text, raw label, per-row choices or None) -> Examples.

    With per-row choices (multiple choice) the answer is a letter; otherwise the label words of the whole
    dataset (``label_names`` or the sorted distinct labels) are the candidates.
    """
    words = [_label_word(raw, spec, w) for w, _, raw, opts in rows if opts is None]
    labels = [str(x) for x in spec.label_names] if spec.label_names is not None else sorted(set(words))
    out = []
    for where, text, raw, opts in rows:
        if opts is not None:
            letters = list(_LETTERS[:len(opts)])
            raw_s = str(raw).strip()
            if raw_s in letters:
                gold = letters.index(raw_s)
            elif raw_s in [str(o) for o in opts]:
                gold = [str(o) for o in opts].index(raw_s)
            elif raw_s.isdigit() and int(raw_s) < len(opts):
                gold = int(raw_s)
            else:
                raise LoramixError(f"{where}: label {raw!r} is neither an index, a letter nor one of the choices")
            out.append(Example(instruction=_classification_prompt(spec, text, opts, letters), output=letters[gold],
                               choices=tuple(letters), label=gold, task=task))
        else:
            word = _label_word(raw, spec, where)
            out.append(Example(instruction=_classification_prompt(spec, text, None, labels), output=word,
                               choices=tuple(labels), label=labels.index(word), task=task))
    return out


def _classification_rows(records: list[tuple[str, Record]]) -> list[tuple[str, str, object, list | None]]:
    rows = []
    for where, rec in records:
        key = next((k for k in ("text", "question", "sentence") if k in rec), None)
        if key is None:
            raise LoramixError(f"{where}: missing field 'text' (or 'question'/'sentence')")
        text = field(rec, key, where)
        label = field(rec, "label", where, types=(int, str))
        choices = rec.get("choices")
        if choices is not None and not (isinstance(choices, list) and choices):
            raise LoramixError(f"{where}: field 'choices' should be a non-empty list")
        rows.append((where, text, label, choices))
    return rows


def _tsv_rows(spec: DatasetSpec) -> list[tuple[str, str, object, None]]:
    names, body = read_tsv_records(spec.path, header=spec.header)
    if not names:
        return []

    def column(wanted: str | None, guesses: tuple[str, ...], fallback: int) -> int:
        if wanted is not None:
            if wanted not in names:
                raise LoramixError(f"{spec.path}: no column {wanted!r} (columns: {', '.join(names)})")
            return names.index(wanted)
        return next((names.index(g) for g in guesses if g in names), fallback % len(names))

    ti = column(spec.text_column, ("sentence", "text"), 0)
    li = column(spec.label_column, ("label",), -1)
    return [(f"{spec.path}:{n}", r[ti], r[li], None) for n, r in body]


def load_examples(spec: DatasetSpec) -> list[Example]:
    """All Examples of one dataset entry (before ``samples``/``weight`` are applied)."""
    if spec.format not in FORMATS and spec.format != "hub":
        raise LoramixError(f"dataset {spec.path!r}: unknown format {spec.format!r} (allowed: {', '.join(FORMATS)})")
    path = spec.path
    if not path:
        if not spec.task:
            raise LoramixError("a dataset entry needs 'path' (a file or hub id) or a built-in 'task'")
        info = builtin_task(spec.task)
        try:
            records = read_hub_records(info.hub[0], subset=info.hub[1], split=spec.split or info.hub[2])
        except LoramixError as e:
            raise LoramixError(f"task {info.name}: no data file given (use {info.name}=PATH); {e}") from None
        return _finish(spec, [info.parse(r, w) for w, r in records], info.hub[0], "reference")
    is_tsv = spec.format == "tsv" or (spec.format == "auto" and path.lower().endswith((".tsv", ".tab")))
    task = canonical_task_name(spec.task) if spec.task else default_task_name(path)
    if is_tsv:
        return _finish(spec, _classification(_tsv_rows(spec), spec, task), path, "tsv")
    if not os.path.exists(path) and (spec.format == "hub" or (spec.format == "auto" and _HUB_ID.match(path)
                                                              and not os.path.splitext(path)[1])):
        records = read_hub_records(path, subset=spec.subset, split=spec.split or "train")
    else:
        records = read_json_records(path)
    if not records:
        raise LoramixError(f"{path}: the dataset is empty")
    fmt = spec.format if spec.format not in ("auto", "hub") else _detect(set(records[0][1]), spec.task, records[0][0])
    if fmt == "commonsense":
        examples = [parse_commonsense(r, w, task) for w, r in records]
    elif fmt == "reference":
        info = TASKS[_reference_task(set(records[0][1]), spec, records[0][0])]
        examples = [info.parse(r, w) for w, r in records]
    elif fmt == "instruction":
        examples = [_instruction(r, w, task) for w, r in records]
    else:
        examples = _classification(_classification_rows(records), spec, task)
    return _finish(spec, examples, path, fmt)


_DEFAULT_TEMPLATE = {"instruction": "alpaca", "commonsense": "alpaca"}


def _finish(spec: DatasetSpec, examples: list[Example], where: str, fmt: str) -> list[Example]:
    """Apply the task name, the template (``spec.template``, else alpaca for instruction data, else plain), the limit."""
    task = canonical_task_name(spec.task) if spec.task else None
    template = spec.template or _DEFAULT_TEMPLATE.get(fmt, "plain")
    examples = [dataclasses.replace(e, task=task or e.task, template=template) for e in examples]
    if spec.limit is not None:
        examples = examples[:spec.limit]
    if not examples:
        raise LoramixError(f"{where}: the dataset is empty")
    return examples


def resample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples: whole copies of the list plus a seeded random part (a subset when n < len)."""
    rng = random.Random(seed)
    whole, part = divmod(n, len(examples))
    order = list(range(len(examples)))
    rng.shuffle(order)
    return examples * whole + [examples[i] for i in sorted(order[:part])]


def load_mixture(specs: list[DatasetSpec], *, seed: int) -> list[Example]:
    """The training mixture: each dataset resampled to ``samples`` (or ``weight`` x its size), concatenated."""
    if not specs:
        raise LoramixError("data.datasets is empty: give at least one training dataset")
    out: list[Example] = []
    for i, spec in enumerate(specs):
        examples = load_examples(spec)
        n = spec.samples if spec.samples is not None else round(spec.weight * len(examples))
        if n < 1:
            raise LoramixError(f"data.datasets[{i}] ({spec.path or spec.task}): samples/weight leave no examples")
        out.extend(resample(examples, n, seed + i))
    return out
