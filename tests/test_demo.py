"""The demo's data generator, and the demo flow itself on a tiny model (the real demo runs SmolLM2 offline)."""
from __future__ import annotations

import json
import shlex
from collections import Counter

import pytest
from helpers_cli import tiny_llama_dir

from loramix.data import load_examples
from loramix import cli
from loramix.data.synthetic import _LANGUAGES, _TOPICS, GENERATORS, synthetic_splits, synthetic_task
from loramix.tools.demo import DEMO_TASKS, demo_config, generation_verdict, write_demo_data
from loramix.errors import LoramixError
from loramix.runconfig import DatasetSpec, build_run_config


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_generator_is_deterministic_disjoint_balanced_and_correct(task):
    train, test = synthetic_splits(task, 200, 50, seed=3)
    assert (train, test) == synthetic_splits(task, 200, 50, seed=3)
    assert train != synthetic_splits(task, 200, 50, seed=4)[0]
    assert len({r["text"] for r in train}) == 200 and not {r["text"] for r in train} & {r["text"] for r in test}
    counts = Counter(r["label"] for r in train)
    assert len(counts) == (2 if task == "sentiment" else 3) and min(counts.values()) > 40
    for r in train[:50]:  # the label is right
        text = r["text"]
        if task == "topic":
            gold = ["sports", "food", "weather"].index(r["label"])
            assert any(text.startswith(f"Headline: {s} ") for s in _TOPICS[gold][0])
        elif task == "language":
            gold = ["English", "French", "Spanish"].index(r["label"])
            assert any(text.startswith(f"Sentence: {s} ") for s in _LANGUAGES[gold][0])
        else:
            assert r["label"] in ("positive", "negative")


def test_generator_errors():
    with pytest.raises(LoramixError, match="unknown synthetic task"):
        synthetic_task("nope", 3)
    with pytest.raises(LoramixError, match="fewer than"):
        synthetic_task("language", 9000)  # only 3 * 6**3 distinct sentences


def test_demo_data_loads_as_classification(tmp_path):
    paths = write_demo_data(str(tmp_path), n_train=20, n_test=5, seed=0)
    assert set(paths) == set(DEMO_TASKS)
    cfg = build_run_config(demo_config("m", None, paths, str(tmp_path), steps=3, seed=0))
    assert [s.task for s in cfg.data.datasets] == list(DEMO_TASKS)
    spec = next(s for s in cfg.data.eval if s.task == "language")  # 5 items may miss a label: label_names lists all
    ex = load_examples(spec)
    assert len(ex) == 5 and all(e.choices == ("English", "French", "Spanish") for e in ex)
    assert ex[0].instruction.startswith("Sentence: ")
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
    assert any(line.startswith("--- generation (topic; ") for line in lines)
    # the next steps it prints are commands that run as printed
    commands = [shlex.split(line.partition("#")[0]) for line in lines[-1].splitlines()[1:]]
    assert [c[1] for c in commands] == ["train", "eval", "inspect", "generate", "export"]
    for argv in commands[1:]:
        assert cli.main(argv[1:]) == 0, argv
    assert (tmp_path / "out" / "inspect" / "router_stats.json").is_file()
    assert (tmp_path / "out" / "moe" / "config.json").is_file()


def test_generation_verdict_reads_the_first_word():
    assert generation_verdict(" food.\nHeadline", "food") == "right: food"
    assert generation_verdict(" French", "French") == "right: French"
    assert generation_verdict(" no", "yes") == "wrong, expected yes"
    assert generation_verdict("", "yes") == "wrong, expected yes"
