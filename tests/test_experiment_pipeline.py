"""The experiment pipeline of experiments/ (issue 7) end to end at toy scale: the real data splits, the
multi-task config trained with every method on the real stories260K model (a byte tokenizer built in code,
two steps), the result JSONs, skipping and resuming units, and the assembled report."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_cli import SHARED, STORIES, adapter_tensors, byte_tokenizer, shared_or_skip

from experiments import report
from experiments.data import prepare
from experiments.run import METHODS, main, read_log, select

TASKS = ("arc-e", "arc-c", "boolq", "obqa", "sst2", "agnews", "trec")
TEST, VAL, STEPS, BATCH = 6, 4, 2, 2


def _run_args(root: Path) -> list[str]:
    sets = {"model.name_or_path": STORIES, "model.tokenizer": root / "tok", "train.max_steps": STEPS,
            "train.micro_batch_size": BATCH, "train.gradient_accumulation_steps": 1, "train.save_steps": 0,
            "data.cutoff_len": 128, "train.eval_batch_size": 8}
    return ["run", "--only", "base", "--only", "multitask/*", "--router-examples", "3", "--threads", "1",
            *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]


def _run_in(root: Path, *commands: list[str]) -> None:
    """``experiments.run`` commands from ``root`` (the configs' data paths are relative: experiments/data/...);
    the runs use one torch thread (a tiny model gains nothing from more), restored afterwards."""
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            for argv in commands:
                assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    shared_or_skip(STORIES)
    shared_or_skip(SHARED / "data" / "sentence_tasks")
    root = tmp_path_factory.mktemp("experiment")
    byte_tokenizer().save_pretrained(root / "tok")
    sizes = prepare(root / "experiments" / "data", val_size=VAL, test_size=TEST, train_size=24)
    _run_in(root, _run_args(root), ["report", "--doc", str(root / "docs" / "results.md")])
    return root, sizes


def _record(root: Path, unit: str) -> dict:
    return json.loads((root / "experiments" / "results" / f"{unit}.json").read_text())


def test_prepared_splits_are_disjoint_and_sized(pipeline):
    root, sizes = pipeline
    assert set(sizes) == set(TASKS)
    for task in TASKS:
        split = {s: (root / "experiments" / "data" / task / f"{s}.jsonl").read_text().splitlines() for s in sizes[task]}
        assert [len(split[s]) for s in ("train", "val", "test")] == [24, VAL, TEST]
        assert not set(split["val"]) & set(split["train"])  # validation is held out of the training pool


def test_every_unit_scores_every_task(pipeline):
    root, _ = pipeline
    for unit in ("base/none", *[f"multitask/{m}" for m in METHODS]):
        r = _record(root, unit)
        assert set(r["eval"]["test"]) == set(TASKS) and set(r["eval"]["val"]) == set(TASKS)
        for split, n in (("test", TEST), ("val", VAL)):
            for res in r["eval"][split].values():
                assert res["n"] == n == len(res["label_correct"])
                assert res["label_acc"] == res["label_correct"].count("1") / n
        assert "train" not in r if unit == "base/none" else r["train"]["steps"] == STEPS


def test_trainable_counts_are_the_saved_adapters(pipeline):
    root, _ = pipeline
    counts = {}
    for m in METHODS:
        r = _record(root, f"multitask/{m}")
        adapter = root / "experiments" / "runs" / "multitask" / m / "adapter"
        counts[m] = sum(t.numel() for t in adapter_tensors(adapter).values())
        assert r["params"]["trainable"] == counts[m]
        assert 0 < r["params"]["share"] < 1
        if m in ("lora", "dora"):
            cfg = json.loads((adapter / "adapter_config.json").read_text())
            assert (cfg["r"], cfg["lora_alpha"], cfg["use_dora"]) == (r["params"]["rank"], 2 * r["params"]["rank"],
                                                                      m == "dora")
    assert counts["lora"] <= counts["mixlora"] and counts["dora"] <= counts["mixdora"]
    assert counts["lora"] > 0.95 * counts["mixlora"]  # the largest rank within the budget


def test_training_record_and_router_load(pipeline):
    root, _ = pipeline
    for m in METHODS:
        r = _record(root, f"multitask/{m}")
        assert [row[0] for row in r["train"]["loss"]] == list(range(1, STEPS + 1))
        assert r["train"]["examples"] == STEPS * BATCH and r["train"]["tokens"] > STEPS * BATCH
        assert r["train"]["tokens_per_s"] > 0 and r["train"]["wall_s"] > 0
        assert r["commands"]["train"].startswith("loramix train ") and f"adapter.method={m}" in r["commands"]["train"]
        if m.startswith("mix"):
            tasks = r["router"]["tasks"]
            assert set(tasks) == {*TASKS, "all"}
            for t in tasks.values():
                assert len(t["layers"]) == 5  # stories260K's layers
                assert all(abs(sum(layer["share"]) - 1) < 1e-9 for layer in t["layers"])
        else:
            assert "router" not in r


def test_finished_units_are_skipped_and_an_interrupted_one_resumes(pipeline, capsys):
    root, _ = pipeline
    results = root / "experiments" / "results" / "multitask"
    run_dir = root / "experiments" / "runs" / "multitask" / "mixlora"
    before = _record(root, "multitask/mixlora")
    stamp = (results / "lora.json").stat().st_mtime_ns
    log = (run_dir / "log.jsonl").read_text()
    os.remove(results / "mixlora.json")  # as if killed after the last checkpoint, before the adapter and the JSON
    os.rename(run_dir / "adapter", run_dir.parent / "mixlora-adapter-removed")
    _run_in(root, _run_args(root))
    out = capsys.readouterr().out
    assert "[multitask/lora] done already" in out and "--resume" in out
    assert (results / "lora.json").stat().st_mtime_ns == stamp
    assert (run_dir / "log.jsonl").read_text() == log  # resumed at the final step: nothing retrained
    after = _record(root, "multitask/mixlora")
    assert after["eval"]["test"] == before["eval"]["test"] and after["params"] == before["params"]


def test_report_shows_results_and_the_units_not_yet_run(pipeline):
    root, _ = pipeline
    doc = (root / "docs" / "results.md").read_text()
    assert "**Status: 5 of 13 units have run.**" in doc and "not complete" in doc
    mix = _record(root, "multitask/mixlora")
    cells = [f"{100 * mix['eval']['test'][t]['label_acc']:.1f}" for t in TASKS]
    assert f"| mixlora | 16 | {mix['params']['trainable']:,} |" in doc and " | ".join(cells) in doc
    assert doc.count("| lora | not yet run |") == 3  # the two single-task settings and the GPU one
    assert "python -m experiments.run run --only multitask_10x/mixlora" in doc  # listed under the GPU units
    for png in ("loss_curves.png", "router_multitask_mixlora.png", "router_multitask_mixdora.png"):
        assert (root / "experiments" / "results" / "figures" / png).is_file()
        assert f"experiments/results/figures/{png})" in doc
    assert "loramix train" in doc and "adapter.method=dora" in doc


def test_paired_bootstrap_and_specialisation():
    def rec(hits: str) -> dict:
        return {"eval": {"test": {"t": {"label_correct": hits}}}}

    assert report.paired_bootstrap(rec("0101"), rec("0101"), ["t"]) == (0.0, 0.0, 0.0)
    d, lo, hi = report.paired_bootstrap(rec("1" * 50), rec("0" * 25 + "1" * 25), ["t"])
    assert d == 50.0 and 30 < lo <= d <= hi < 70
    router = {"tasks": {"a": {"layers": [{"share": [1.0, 0.0], "load_entropy": 0.0}]},
                        "b": {"layers": [{"share": [0.0, 1.0], "load_entropy": 0.0}]},
                        "all": {"layers": [{"share": [0.5, 0.5], "load_entropy": 0.693}]}}}
    assert report.specialisation(router) == {"a": {"load_entropy": 0.0, "tv": 0.5}, "b": {"load_entropy": 0.0, "tv": 0.5}}


def test_constant_answer_detects_a_model_that_always_gives_one_choice():
    labels = np.array([0, 2, 2, 1, 2, 0, 3, 2])
    always_2 = {"eval": {"test": {"t": {"label_correct": "".join("1" if x == 2 else "0" for x in labels)}}}}
    assert report.constant_answer(always_2, "t", labels) == (1.0, 2)
    perfect = {"eval": {"test": {"t": {"label_correct": "1" * len(labels)}}}}
    share, _ = report.constant_answer(perfect, "t", labels)
    assert share == 0.5  # all right: agrees with "always 2" exactly where the label is 2


def test_report_shows_answer_collapse_and_places_the_findings_first(pipeline):
    root, _ = pipeline
    doc = (root / "docs" / "results.md").read_text()
    assert "## Does the model answer, or repeat one answer?" in doc
    assert "| multitask | " + " | ".join(TASKS) + " |" in doc
    if report.FINDINGS.exists():  # the conclusions written after the runs come before the setup
        assert doc.index("## Findings") < doc.index("## Setup")


def test_read_log_sums_sessions_and_keeps_the_last_record_per_step(tmp_path):
    rows = [(1, 3.0, 10.0), (2, 2.5, 20.0), (2, 2.4, 4.0), (3, 2.0, 9.0)]  # resumed after step 1's checkpoint
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": x, "aux_loss": 0.0, "elapsed_s": e}) + "\n"
                            for s, x, e in rows))
    log = read_log(path)
    assert log["loss"] == [[1, 3.0, 0.0], [2, 2.4, 0.0], [3, 2.0, 0.0]]
    assert (log["steps"], log["wall_s"], log["sessions"]) == (3, 29.0, 2)


def test_unit_selection():
    assert [u.name for u in select(["multitask/*"])] == [f"multitask/{m}" for m in METHODS]
    assert [u.name for u in select(["base", "single_agnews/dora"])] == ["base/none", "single_agnews/dora"]
    assert len(select([])) == 13  # the CPU grid; the GPU setting runs only when named
    assert [u.name for u in select(["multitask_10x/mixlora"])] == ["multitask_10x/mixlora"]
    with pytest.raises(SystemExit, match="no unit matches"):
        select(["multitask/qlora"])
