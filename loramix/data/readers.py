"""Read records from JSON, JSONL and TSV files (or the hub), with errors that name the file and line."""
from __future__ import annotations

import csv
import json
import os
from typing import Any

from ..errors import LoramixError, Problems

Record = dict[str, Any]
MAX_PROBLEMS_PER_FILE = 5  # record problems reported per file; the rest are counted


def raise_problems(problems: Problems, where: str) -> None:
    """One LoramixError with the first MAX_PROBLEMS_PER_FILE of a file's problems and a count of the rest."""
    lines = problems.lines[:MAX_PROBLEMS_PER_FILE]
    if len(problems) > MAX_PROBLEMS_PER_FILE:
        lines.append(f"{where}: {len(problems) - MAX_PROBLEMS_PER_FILE} more records with problems")
    if lines:
        raise LoramixError(*lines)


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise LoramixError(f"{path}: no such file")
    if os.path.isdir(path):
        raise LoramixError(f"{path}: is a folder, expected a .json, .jsonl or .tsv file")


def read_json_records(path: str) -> list[tuple[str, Record]]:
    """Records of a JSON array file or a JSONL file, each with where it came from ("file:LINE" or "file: record N")."""
    _check_exists(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise LoramixError(f"{path}: not a UTF-8 text file (byte {e.start}); expected JSON or JSON lines") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoramixError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise LoramixError(f"{path}: expected a JSON array of objects or JSON lines")
        records, problems = [], Problems()
        for i, rec in enumerate(data, 1):
            if problems.check(_as_record, f"{path}: record {i}", rec):
                records.append((f"{path}: record {i}", rec))
        raise_problems(problems, path)
        return records
    out, problems = [], Problems()
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            rec = problems.result(_json_line, line, f"{path}:{lineno}")
            if rec is not None:
                out.append((f"{path}:{lineno}", rec))
    raise_problems(problems, path)
    return out


def _json_line(line: str, where: str) -> Record:
    try:
        return _as_record(where, json.loads(line))
    except json.JSONDecodeError as e:
        raise LoramixError(f"{where}: malformed JSON line: {e.msg}") from None


def _as_record(where: str, rec: Any) -> Record:
    if not isinstance(rec, dict):
        raise LoramixError(f"{where}: expected a JSON object, found {type(rec).__name__}")
    return rec


def read_tsv_records(path: str, *, header: bool | None = None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Column names (from the header row, or "0", "1", ... without one) and the rows with line numbers.

    ``header=None`` guesses: the first row is a header when its last cell is not a label seen below it.
    """
    _check_exists(path)
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = [(i, r) for i, r in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1) if r]
    if not rows:
        return [], []
    if header is None:
        first = rows[0][1]
        header = len(rows) > 1 and first[-1] not in {r[-1] for _, r in rows[1:50]}
    width = len(rows[0][1])
    names = [c.strip() for c in rows[0][1]] if header else [str(i) for i in range(width)]
    body = rows[1:] if header else rows
    problems = Problems()
    for lineno, r in body:
        if len(r) != width:
            problems.add(f"{path}:{lineno}: expected {width} tab-separated columns, found {len(r)}")
    raise_problems(problems, path)
    return names, body


def read_hub_records(name: str, *, split: str, subset: str | None = None) -> list[tuple[str, Record]]:
    """Rows of a Hugging Face hub dataset (needs the ``datasets`` package and hub access)."""
    try:
        import datasets  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise LoramixError(f"dataset {name!r} is not a local file, and loading it from the hub needs the "
                           "'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # noqa: BLE001 (any hub failure is a user-facing error)
        raise LoramixError(f"could not load hub dataset {name!r} (split {split!r}): {e}") from None
    return [(f"{name}[{split}] row {i}", dict(r)) for i, r in enumerate(ds, 1)]


def field(rec: Record, key: str, where: str, *, types: tuple[type, ...] = (str,)) -> Any:
    """``rec[key]``, or a LoramixError naming the file/line and the missing or mistyped field."""
    if key not in rec:
        raise LoramixError(f"{where}: missing field {key!r} (found: {', '.join(sorted(rec)) or 'none'})")
    value = rec[key]
    if not isinstance(value, types):
        raise LoramixError(f"{where}: field {key!r} should be {'/'.join(t.__name__ for t in types)}, "
                           f"found {type(value).__name__}")
    return value
