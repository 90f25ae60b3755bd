"""The demo's data generator, and the demo flow itself on a tiny model (the real demo runs SmolLM2 offline)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers_cli import tiny_llama_dir

from loramix.data import load_examples
from loramix.data.synthetic import _TOPICS, GENERATORS, synthetic_splits, synthetic_task
from loramix.tools.demo import DEMO_TASKS, demo_config, write_demo_data
from loramix.errors import LoramixError
from loramix.runconfig import DatasetSpec, build_run_config


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_generator_is_deterministic_disjoint_balanced_and_correct(task):
    train, test = synthetic_splits(task, 200, 50, seed=3)
    assert (train, test) == synthetic_splits(task, 200, 50, seed=3)
    assert train != synthetic_splits(task, 200, 50, seed=4)[0]
    assert len({r["text"] for r in train}) == 200 and not {r["text"] for r in train} & {r["text"] for r in test}
    counts = Counter(r["label"] for r in train)
    assert len(counts) == (3 if task == "topic" else 2) and min(counts.values()) > 40
    for r in train[:50]:  # the label is right
        text = r["text"]
        if task == "topic":
            gold = ["sports", "food", "weather"].index(r["label"])
            assert any(text.startswith(f"Headline: {s} ") for s in _TOPICS[gold][0])
        elif task == "compare":
            a, b = int(text.split()[1]), int(text.split()[4].rstrip("?"))
            assert r["label"] == ("yes" if a > b else "no")
        else:
            assert r["label"] in ("positive", "negative")


def test_generator_errors():
    with pytest.raises(LoramixError, match="unknown synthetic task"):
        synthetic_task("nope", 3)
    with pytest.raises(LoramixError, match="fewer than"):
        synthetic_task("compare", 9000)  # only 90 * 89 distinct pairs


def test_demo_data_loads_as_classification(tmp_path):
    paths = write_demo_data(str(tmp_path), n_train=20, n_test=5, seed=0)
    assert set(paths) == set(DEMO_TASKS)
    cfg = build_run_config(demo_config("m", None, paths, str(tmp_path), steps=3, seed=0))
    assert [s.task for s in cfg.data.datasets] == list(DEMO_TASKS)
    ex = load_examples(DatasetSpec(path=paths["compare"]["test"], task="compare", instruction=""))
    assert len(ex) == 5 and ex[0].choices == ("no", "yes") and ex[0].instruction.startswith("Is ")
    assert ex[0].instruction.endswith("?\nAnswer:")


def test_demo_flow_on_a_tiny_model(tmp_path):
    from loramix.tools.demo import run_demo

    model = tiny_llama_dir(tmp_path / "model")
    lines = []
    summary = run_demo(str(tmp_path / "out"), model=str(model), steps=2, n_train=8, n_test=4, echo=lines.append)
    assert set(summary["before"]) == set(DEMO_TASKS) | {"average"} and summary["steps"] == 2
    assert (tmp_path / "out" / "router_heatmap.png").is_file()
    assert (tmp_path / "out" / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "demo_results.json").read_text())["wall_s"] > 0
    assert any("generation (topic)" in line for line in lines)
