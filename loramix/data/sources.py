"""Turn a dataset entry of the run config into Examples: format detection, parsing, multi-task mixing."""
from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Callable
from typing import TypeVar

from ..errors import LoramixError, Problems
from ..runconfig import DATA_FORMATS, DatasetSpec
from .example import Example
from .readers import Record, field, raise_problems, read_hub_records, read_json_records, read_tsv_records
from .tasks import TASKS, builtin_task, canonical_task_name, parse_commonsense
from .templates import TEMPLATE_NAMES

FORMATS = tuple(f for f in DATA_FORMATS if f != "hub")  # the file formats
CHECKED_RECORDS = 200  # records check_dataset parses per dataset
T = TypeVar("T")
U = TypeVar("U")
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


def _each(items: list[T], parse: Callable[[T], U], where: str) -> list[U]:
    """``parse`` every item; one LoramixError listing the first few failures (a line each) if any fail."""
    out, problems = [], Problems()
    for item in items:
        ok, value = problems.run(parse, item)
        if ok:
            out.append(value)
    raise_problems(problems, where)
    return out


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
    words = _each([r for r in rows if r[3] is None], lambda r: _label_word(r[2], spec, r[0]), spec.path)
    labels = [str(x) for x in spec.label_names] if spec.label_names is not None else sorted(set(words))
    return _each(rows, lambda row: _classification_example(row, spec, task, labels), spec.path)


def _classification_example(row: tuple[str, str, object, list | None], spec: DatasetSpec, task: str,
                            labels: list[str]) -> Example:
    where, text, raw, opts = row
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
        return Example(instruction=_classification_prompt(spec, text, opts, letters), output=letters[gold],
                       choices=tuple(letters), label=gold, task=task)
    word = _label_word(raw, spec, where)
    return Example(instruction=_classification_prompt(spec, text, None, labels), output=word,
                   choices=tuple(labels), label=labels.index(word), task=task)


def _classification_rows(records: list[tuple[str, Record]], where: str) -> list[tuple[str, str, object, list | None]]:
    return _each(records, lambda item: _classification_row(*item), where)


def _classification_row(where: str, rec: Record) -> tuple[str, str, object, list | None]:
    key = next((k for k in ("text", "question", "sentence") if k in rec), None)
    if key is None:
        raise LoramixError(f"{where}: missing field 'text' (or 'question'/'sentence')")
    text = field(rec, key, where)
    label = field(rec, "label", where, types=(int, str))
    choices = rec.get("choices")
    if choices is not None and not (isinstance(choices, list) and choices):
        raise LoramixError(f"{where}: field 'choices' should be a non-empty list")
    return where, text, label, choices


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


def _on_hub(spec: DatasetSpec) -> bool:
    """Whether ``spec.path`` names a hub dataset rather than a local file."""
    return not os.path.exists(spec.path) and (spec.format == "hub" or (
        spec.format == "auto" and bool(_HUB_ID.match(spec.path)) and not os.path.splitext(spec.path)[1]))


def load_examples(spec: DatasetSpec, *, first: int | None = None) -> list[Example]:
    """All Examples of one dataset entry (before ``samples``/``weight`` are applied); ``first``: only those of
    its first records (a quick check). Every bad record up to a few gets its own line in the error."""
    if spec.format not in FORMATS and spec.format != "hub":
        raise LoramixError(f"dataset {spec.path!r}: unknown format {spec.format!r} (allowed: {', '.join(FORMATS)})")
    if spec.template is not None and spec.template not in TEMPLATE_NAMES:
        raise LoramixError(f"dataset {spec.path or spec.task!r}: unknown template {spec.template!r} "
                           f"(allowed: {', '.join(TEMPLATE_NAMES)})")
    path = spec.path
    if not path:
        if not spec.task:
            raise LoramixError("a dataset entry needs 'path' (a file or hub id) or a built-in 'task'")
        info = builtin_task(spec.task)
        try:
            records = read_hub_records(info.hub[0], subset=info.hub[1], split=spec.split or info.hub[2])
        except LoramixError as e:
            raise LoramixError(f"task {info.name}: no data file given (use {info.name}=PATH); {e}") from None
        return _finish(spec, _each(records[:first], lambda item: info.parse(item[1], item[0]), info.hub[0]),
                       info.hub[0], "reference")
    is_tsv = spec.format == "tsv" or (spec.format == "auto" and path.lower().endswith((".tsv", ".tab")))
    task = canonical_task_name(spec.task) if spec.task else default_task_name(path)
    if is_tsv:
        return _finish(spec, _classification(_tsv_rows(spec)[:first], spec, task), path, "tsv")
    if _on_hub(spec):
        records = read_hub_records(path, subset=spec.subset, split=spec.split or "train")
    else:
        records = read_json_records(path)
    if not records:
        raise LoramixError(f"{path}: the dataset is empty")
    records = records[:first]
    fmt = spec.format if spec.format not in ("auto", "hub") else _detect(set(records[0][1]), spec.task, records[0][0])
    if fmt == "commonsense":
        examples = _each(records, lambda item: parse_commonsense(item[1], item[0], task), path)
    elif fmt == "reference":
        info = TASKS[_reference_task(set(records[0][1]), spec, records[0][0])]
        examples = _each(records, lambda item: info.parse(item[1], item[0]), path)
    elif fmt == "instruction":
        examples = _each(records, lambda item: _instruction(item[1], item[0], task), path)
    else:
        examples = _classification(_classification_rows(records, path), spec, task)
    return _finish(spec, examples, path, fmt)


def check_dataset(spec: DatasetSpec) -> None:
    """A quick check before anything slow: the file exists and its first CHECKED_RECORDS records parse in its
    format. A built-in task without a file is checked by name and a hub dataset not at all: they are fetched
    when the data loads."""
    if not spec.path:
        if not spec.task:
            raise LoramixError("a dataset entry needs 'path' (a file or hub id) or a built-in 'task'")
        builtin_task(spec.task)
    elif not _on_hub(spec):
        load_examples(spec, first=CHECKED_RECORDS)


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
    """The training mixture: each dataset resampled to ``samples`` (or ``weight`` x its size), concatenated.
    One LoramixError names the problems of every dataset (``data.datasets[i]: ...``)."""
    if not specs:
        raise LoramixError("data.datasets is empty: give at least one training dataset")
    out: list[Example] = []
    problems = Problems()
    for i, spec in enumerate(specs):
        examples = problems.result(load_examples, spec, prefix=f"data.datasets[{i}]: ")
        if examples is None:
            continue
        n = spec.samples if spec.samples is not None else round(spec.weight * len(examples))
        if n < 1:
            problems.add(f"data.datasets[{i}] ({spec.path or spec.task}): samples/weight leave no examples")
        out.extend(resample(examples, n, seed + i))
    problems.raise_if_any()
    return out
