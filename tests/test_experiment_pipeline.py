"""The experiment pipeline of experiments/ (issues 7 and 18) end to end at toy scale: the real data splits, the
multi-task config trained with every method and the learning curve (three lengths, a second seed run as
parallel processes, a cost probe) on the real stories260K model (a byte tokenizer built in code, a few steps),
the result JSONs, skipping and resuming units, and the assembled report with its curve sections."""
from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_cli import SHARED, STORIES, adapter_tensors, byte_tokenizer, shared_or_skip

from experiments import curve, report, stats
from experiments.data import prepare
from experiments.run import (CURVE, METHODS, Runner, Unit, main, read_log, schedule_overrides, select, setting_tasks,
                             unit_lock)

TASKS = ("arc-e", "arc-c", "boolq", "obqa", "sst2", "agnews", "trec")
CURVE_TASKS = ("sst2", "agnews", "trec", "subj", "cr", "mpqa")
TEST, VAL, STEPS, BATCH = 6, 4, 2, 2
SCALE = "0.02"  # the curve's 84 / 280 / 840 steps become 2 / 6 / 17 (8 examples each, as configured)
CURVE_STEPS = {"curve_84": 2, "curve_280": 6, "curve_840": 17}


def _sets(root: Path, **extra) -> list[str]:
    sets = {"model.name_or_path": STORIES, "model.tokenizer": root / "tok", "train.save_steps": 0,
            "data.cutoff_len": 128, "train.eval_batch_size": 8, **extra}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def _run_args(root: Path) -> list[str]:
    return ["run", "--only", "base", "--only", "multitask/*", "--router-examples", "3", "--threads", "1",
            *_sets(root, **{"train.max_steps": STEPS, "train.micro_batch_size": BATCH,
                            "train.gradient_accumulation_steps": 1})]


def _curve_args(root: Path, *only: str, jobs: int = 1) -> list[str]:
    return ["run", *[x for o in only for x in ("--only", o)], "--scale", SCALE, "--router-examples", "3",
            "--threads", "1", "--jobs", str(jobs), *_sets(root)]


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
    _run_in(root, _run_args(root), _curve_args(root, "curve-core"),
            _curve_args(root, "curve_840/*lora+seed43", jobs=2),  # two processes at once
            ["probe", "--only", "curve_840/lora", "--only", "curve_840/mixlora", "--steps", "2", "--eval-items", "2",
             "--scale", SCALE, "--threads", "1", *_sets(root)],
            ["report", "--doc", str(root / "docs" / "results.md")])
    return root, sizes


def _record(root: Path, unit: str) -> dict:
    return json.loads((root / "experiments" / "results" / f"{unit}.json").read_text())


def test_prepared_splits_are_disjoint_and_sized(pipeline):
    root, sizes = pipeline
    assert set(sizes) == {*TASKS, *CURVE_TASKS}
    for task in sizes:
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
    assert "python -m experiments.run run --only 'multitask_10x/*'" in doc  # the GPU units: one command
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


# ---- the learning curve (issue 18) ----------------------------------------------------------------------------
def test_curve_units_run_at_their_lengths_with_the_data_scaled_alike(pipeline):
    root, _ = pipeline
    for setting, steps in CURVE_STEPS.items():
        per_task = None
        for method in ("lora", "mixlora"):
            r = _record(root, f"{setting}/{method}")
            cfg = r["resolved_config"]
            assert r["train"]["steps"] == cfg["train"]["max_steps"] == steps
            assert r["train"]["examples"] <= 8 * steps  # the config's 8 a step (fewer: byte prompts over the cutoff)
            (samples,) = {d["samples"] for d in cfg["data"]["datasets"]}  # every task alike
            assert per_task in (None, samples)  # and both methods
            per_task = samples
            assert 6 * samples >= 8 * steps  # one pass: no example repeats
            assert cfg["train"]["warmup_ratio"] == 0.06 and cfg["data"]["cutoff_len"] <= 128
            assert set(r["eval"]["test"]) == set(CURVE_TASKS) == set(r["eval"]["val"])
            c = r["cost"]
            assert c["train_s"] == r["train"]["wall_s"] > 0 and c["s_per_step"] > 0 and c["threads"] == 1
            assert 0 < c["score_s"] <= c["session_s"] and c["cpu_s"] > 0
    assert set(_record(root, "curve/none")["eval"]["test"]) == set(CURVE_TASKS)


def test_a_seed_repeat_runs_in_its_own_process_with_its_own_seed(pipeline):
    root, _ = pipeline
    runs = root / "experiments" / "runs" / "curve_840"
    for method in ("lora", "mixlora"):
        first, repeat = _record(root, f"curve_840/{method}"), _record(root, f"curve_840/{method}+seed43")
        assert (first["resolved_config"]["train"]["seed"], repeat["resolved_config"]["train"]["seed"]) == (42, 43)
        assert repeat["train"]["steps"] == first["train"]["steps"]
        assert repeat["train"]["loss"] != first["train"]["loss"]  # other data order and initialisation
        assert repeat["machine"]["threads"] == 1
        assert f"wrote experiments/results/curve_840/{method}+seed43.json" in (runs / f"{method}+seed43.log").read_text()


def test_report_has_the_curve_sections_and_the_plan(pipeline):
    root, _ = pipeline
    doc = (root / "docs" / "results.md").read_text()
    assert "**Learning curve: 9 of 21 units have run**" in doc
    for png in ("curve_accuracy.png", "curve_tasks.png", "curve_router.png"):
        assert (root / "experiments" / "results" / "figures" / png).is_file() and f"figures/{png})" in doc
    verdict = next(line for line in doc.splitlines() if line.startswith("**MixLoRA − LoRA**"))
    assert any(f"The gap **{w}**" in verdict for w in ("closes", "holds", "widens", "reverses")) or "No clear gap" in verdict
    for steps in CURVE_STEPS.values():
        assert f"at {steps} steps" in verdict
    assert "**DoRA − LoRA**: not yet run." in doc
    assert "Seed noise at 17 steps (2 seeds)" in doc
    mix = _record(root, "curve_84/mixlora")
    assert f"| mixlora | {100 * stats.mean_acc(mix, list(CURVE_TASKS)):.1f} [" in doc  # the accuracy table
    assert "| dora | not yet run | not yet run | not yet run |" in doc
    assert "| mixlora | 17 |" in doc  # the router table at the longest length
    assert "| curve_840/mixlora+seed43 | 17 |" in doc  # the cost table
    assert "| curve_84 | sst2 | agnews | trec | subj | cr | mpqa |" in doc  # answer-collapse check per length
    assert "| curve_840/mixlora | " in doc.split("### The learning curve")[1]  # the probe's row in the plan
    assert "| `curve-dora`: DoRA and MixDoRA at every length | 6 |" in doc


def _gap_records(gaps: list[float], n: int = 1000) -> dict[str, dict]:
    """Records of a and b on one task at CURVE's lengths (10, 100, 1000 steps), b right on the first half of
    the items and a differing from it on ``round(|gap| x n / 100)`` items, so acc(a) - acc(b) = gap points."""
    def record(setting, method, right, steps):
        return {"unit": f"{setting}/{method}", "setting": setting, "method": method, "train": {"steps": steps},
                "resolved_config": {"train": {"seed": 42}},
                "eval": {"test": {"t": {"label_correct": "".join("01"[x] for x in right), "label_acc": float(np.mean(right))}}}}
    res = {}
    for (setting, steps), gap in zip(zip(CURVE, (10, 100, 1000)), gaps):
        b = np.arange(n) < n // 2
        a = b.copy()
        k = round(abs(gap) * n / 100)
        if gap < 0:
            a[:k] = False  # a misses some items b gets
        else:
            a[n // 2:n // 2 + k] = True  # a gets some items b misses
        res[f"{setting}/mixlora"] = record(setting, "mixlora", a.astype(int), steps)
        res[f"{setting}/lora"] = record(setting, "lora", b.astype(int), steps)
    return res


@pytest.mark.parametrize("gaps, verdict", [([-6, -4, -2], "closes"), ([-4, -4, -4], "holds"), ([-2, -4, -6], "widens"),
                                           ([-4, 0, 4], "reverses"), ([0, 2, 4], "opens")])
def test_trend_verdicts_follow_the_data(gaps, verdict):
    res = _gap_records(gaps)
    c = curve.curve_records(res)
    points = curve.gap_curve(c, "mixlora", "lora", ["t"], stats.item_draws(res["curve_84/lora"], ["t"]))
    assert [round(p.value, 6) for p in points] == gaps
    assert all(p.lo <= p.value <= p.hi for p in points)
    trend = curve.fit_trend(points)
    assert trend.verdict == verdict
    assert trend.slope == pytest.approx((gaps[2] - gaps[0]) / 2)  # points per tenfold steps
    text = curve.trend_text("mixlora", "lora", trend, no_repeat_steps=5000, tasks=["t"])
    assert f"**{verdict}**" in text or verdict == "opens" and "pulls ahead" in text
    if verdict == "closes":  # -6, -4, -2 at 10, 100, 1000 steps: the line reaches zero at 10,000
        assert trend.crossover == pytest.approx(1e4) and trend.cross_lo < 1e4 < trend.cross_hi
        assert "about 10,000 steps" in text and "extrapolated 10.0x past the longest run" in text
        assert "past 5,000 steps the smallest training pool runs out" in text and "Trust in that figure: little" in text
    else:
        assert trend.crossover is None


def test_schedule_overrides_scale_steps_and_examples_together():
    def sets(setting, method="lora", seed=None, scale=Fraction(1)):
        unit = Unit(setting, method, seed=seed)
        return schedule_overrides(unit, str(unit.config), [], scale)

    assert sets("curve_840") == [] and sets("curve_840", seed=43) == ["train.seed=43"]
    assert sets("curve_280") == ["train.max_steps=280", *[f"data.datasets.{i}.samples=374" for i in range(6)]]
    assert sets("curve_84")[0] == "train.max_steps=84" and sets("curve_84")[1].endswith("=112")
    assert sets("multitask", scale=Fraction(1, 2)) == ["train.max_steps=42", "train.warmup_steps=3",
                                                       *[f"data.datasets.{i}.samples=48" for i in range(7)]]
    assert sets("curve", "none", scale=Fraction(1, 2)) == []  # the base model trains nothing
    assert setting_tasks("curve_84") == list(CURVE_TASKS) and set(CURVE) == set(CURVE_STEPS)


def test_a_unit_held_by_another_process_is_skipped(tmp_path):
    runner = Runner(results=tmp_path / "results", runs=tmp_path / "runs", echo=lambda s: None)
    unit = Unit("curve", "none")
    with unit_lock(tmp_path / "runs" / "curve" / ".none.unit.lock") as held:
        assert held
        with unit_lock(tmp_path / "runs" / "curve" / ".none.unit.lock") as again:
            assert not again
        assert runner.run(unit) is None  # before loading anything
    assert not unit.result_path(runner.results).exists()


def test_curve_groups_and_patterns_select_units():
    assert [u.name for u in select(["curve-core"])] == ["curve/none", *[f"curve_{s}/lora" for s in (84, 280, 840)],
                                                        *[f"curve_{s}/mixlora" for s in (84, 280, 840)]]
    assert [u.name for u in select(["curve-seeds"])] == ["curve_840/lora+seed43", "curve_840/lora+seed44",
                                                         "curve_840/mixlora+seed43", "curve_840/mixlora+seed44"]
    assert len(select(["curve_840"])) == 12 and len(select(list(curve.GROUP_TEXT))) == 21
