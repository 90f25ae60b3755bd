"""The experiment's data: train / validation / test JSONL files per task, cut from the originals in ../shared.

Every task gets three files under ``<out>/<task>/``:

* ``train.jsonl``: the original training split minus the validation part (the pool the run configs sample from);
* ``val.jsonl``: ``val_size`` examples held out of the training split (seeded), for every choice we make
  (learning rate, aux coefficient, ...); the test splits are never used for choices;
* ``test.jsonl``: ``test_size`` examples of the original test split (a seeded subset when it is larger).

Commonsense tasks keep their LLM-Adapters records (``instruction``/``input``/``output``/``answer``), scored
over ``answer1..N`` / ``true``/``false``. The classification tasks are written as ``{"text", "label"}`` with
``label`` an index into the task's ``LABELS`` (the run configs pass them as ``label_names``, so train, val and
test share one candidate set even when a small file lacks a class). AG News has no training split in
../shared; its ``dev.tsv`` (10,000 items, disjoint from ``test.tsv``) serves as the training split.

SUBJ, CR and MPQA come as one labelled pool (a file per class, no splits): exact duplicate texts are merged
(texts given both labels dropped) and a fixed seeded ``TEST_POOL`` items become the test split, the rest the
training split, so the partition does not depend on ``prepare``'s sizes or seed. MR is left out: its Rotten
Tomatoes sentences are the ones SST-2 was built from, so MR's labels would leak SST-2's test answers.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

SHARED = Path(__file__).resolve().parents[2] / "shared"

# label words of the classification tasks, in index order (the configs' ``label_names``)
LABELS = {
    "sst2": ["negative", "positive"],
    "agnews": ["world", "sports", "business", "science"],
    "trec": ["abbreviation", "description", "entity", "human", "location", "number"],
    "subj": ["objective", "subjective"],
    "cr": ["negative", "positive"],
    "mpqa": ["negative", "positive"],
}
_AGNEWS = {"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3}
_TREC = {"ABBR": 0, "DESC": 1, "ENTY": 2, "HUM": 3, "LOC": 4, "NUM": 5}
_COMMONSENSE = {"arc-e": "ARC-Easy", "arc-c": "ARC-Challenge", "boolq": "boolq", "obqa": "openbookqa"}
TASKS = (*_COMMONSENSE, *LABELS)
VAL_SIZE, TEST_SIZE = 100, 500  # per task
TEST_POOL = 1000  # items of a pooled task (SUBJ, CR, MPQA) set aside as its test split


def _commonsense(folder: str) -> Callable[[Path, str], list[dict]]:
    def read(shared: Path, split: str) -> list[dict]:
        with open(shared / "data" / "commonsense" / folder / f"{split}.json", encoding="utf-8") as f:
            return json.load(f)
    return read


def _tsv(shared: Path, rel: str, label: Callable[[str], int]) -> list[dict]:
    """Rows ``text<TAB>label`` (a header row whose label column is ``label`` is skipped)."""
    out = []
    with open(shared / "data" / rel, encoding="utf-8") as f:
        for line in f:
            text, _, raw = line.rstrip("\n").rpartition("\t")
            if text.startswith('"') and text.endswith('"'):  # CSV-style quoting in AG News
                text = text[1:-1].replace('""', '"')
            if text and raw.strip() != "label":
                out.append({"text": text.strip(), "label": label(raw.strip())})
    return out


def _sst2(shared: Path, split: str) -> list[dict]:
    return _tsv(shared, f"sst2_agnews/SST-2/{split}.tsv", int)


def _agnews(shared: Path, split: str) -> list[dict]:
    return _tsv(shared, f"sst2_agnews/agnews/{'dev' if split == 'train' else 'test'}.tsv", _AGNEWS.__getitem__)


def _trec(shared: Path, split: str) -> list[dict]:
    name = "train_5500.label" if split == "train" else "TREC_10.label"
    out = []
    with open(shared / "data" / "sentence_tasks" / "TREC" / name, encoding="latin-1") as f:
        for line in f:
            tag, _, question = line.strip().partition(" ")
            if question:
                out.append({"text": question, "label": _TREC[tag.split(":")[0]]})
    return out


def _pooled(files: tuple[str, ...]) -> Callable[[Path, str], list[dict]]:
    """A task shipped as one file per class (``files[k]`` holds the texts of label ``k``, relative to
    ``data/sentence_tasks``): duplicates merged, texts given both labels dropped, then the first ``TEST_POOL``
    of a fixed seeded shuffle are the test split and the rest the training split (in file order)."""
    def read(shared: Path, split: str) -> list[dict]:
        labels: dict[str, set[int]] = {}
        for label, rel in enumerate(files):
            with open(shared / "data" / "sentence_tasks" / rel, encoding="latin-1") as f:
                for line in f:
                    if line.strip():
                        labels.setdefault(line.strip(), set()).add(label)
        pool = [{"text": text, "label": ks.pop()} for text, ks in labels.items() if len(ks) == 1]
        order = list(range(len(pool)))
        random.Random(0).shuffle(order)
        test = set(order[:TEST_POOL])
        return [r for i, r in enumerate(pool) if (i in test) == (split == "test")]
    return read


READERS: dict[str, Callable[[Path, str], list[dict]]] = {
    **{task: _commonsense(folder) for task, folder in _COMMONSENSE.items()},
    "sst2": _sst2, "agnews": _agnews, "trec": _trec,
    "subj": _pooled(("SUBJ/subj.objective", "SUBJ/subj.subjective")),
    "cr": _pooled(("CR/custrev.neg", "CR/custrev.pos")),
    "mpqa": _pooled(("MPQA/mpqa.neg", "MPQA/mpqa.pos")),
}


def _subset(n: int, size: int | None, rng: random.Random) -> list[int]:
    """A seeded ``size``-subset of ``range(n)`` in original order (everything when ``size`` is None or >= n)."""
    return sorted(rng.sample(range(n), size)) if size is not None and size < n else list(range(n))


def split_records(train: list[dict], test: list[dict], *, val_size: int, test_size: int, seed: int,
                  train_size: int | None = None) -> dict[str, list[dict]]:
    """``{"train", "val", "test"}``: ``val_size`` seeded items out of ``train``, the rest (original order; a
    seeded ``train_size`` subset of it if given) as train, and a seeded ``test_size`` subset of ``test``."""
    rng = random.Random(seed)
    held = set(rng.sample(range(len(train)), min(val_size, len(train) // 2)))
    rest = [r for i, r in enumerate(train) if i not in held]
    return {"train": [rest[i] for i in _subset(len(rest), train_size, rng)],
            "val": [train[i] for i in sorted(held)],
            "test": [test[i] for i in _subset(len(test), test_size, rng)]}


def prepare(out: str | os.PathLike, *, shared: str | os.PathLike = SHARED, tasks: tuple[str, ...] = TASKS,
            val_size: int = VAL_SIZE, test_size: int = TEST_SIZE, train_size: int | None = None,
            seed: int = 0) -> dict[str, dict[str, int]]:
    """Write ``<out>/<task>/{train,val,test}.jsonl`` for ``tasks``; return the sizes per task and split.
    ``train_size`` caps the training pools (the scaled-down CI run; the experiment keeps them whole)."""
    sizes = {}
    for task in tasks:
        read = READERS[task]
        splits = split_records(read(Path(shared), "train"), read(Path(shared), "test"), val_size=val_size,
                               test_size=test_size, train_size=train_size, seed=seed)
        folder = Path(out) / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, records in splits.items():
            tmp = folder / f".{split}.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            os.replace(tmp, folder / f"{split}.jsonl")
        sizes[task] = {split: len(records) for split, records in splits.items()}
    return sizes
