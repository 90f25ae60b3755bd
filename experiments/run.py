"""The LoRA / DoRA / MixLoRA / MixDoRA comparison, one resumable unit per (setting, method).

    python -m experiments.run prepare                     # data splits + link to the SmolLM2 .gguf
    python -m experiments.run run [--only multitask/mixlora ...] [--threads N] [--jobs N] [--set KEY=VALUE ...]
    python -m experiments.run probe --only curve_840/mixlora --steps 6 --threads 1   # cost per step, briefly
    python -m experiments.run report                      # docs/results.md from experiments/results/*.json
    python -m experiments.run list                        # which units are done

A setting is a run config in ``experiments/configs`` (``multitask``, ``single_arc-e``, ``single_agnews``), or
one length of the learning curve (``curve_84``, ``curve_280``, ``curve_840``: ``configs/curve.yaml`` at that
many of its steps, its datasets' ``samples`` scaled alike); a unit trains one method on it with ``loramix
train CONFIG --set adapter.method=M ...`` (the same data, steps, schedule and seed for every method; LoRA/DoRA
at the rank that matches the MixLoRA/MixDoRA budget, with the same alpha/r), then scores the adapter on the
test and validation splits and, for the mixtures, records the router load per task. Units ``base/none`` and
``curve/none`` score the base model alone on the grid's and the curve's tasks; ``curve_840/M+seedN`` repeats a
unit with another training seed. Each unit writes ``<results>/<setting>/<unit>.json`` when it has finished,
with what it cost (``cost``: seconds of training, scoring and in all, CPU seconds, threads, load average); a
unit whose JSON exists is skipped, an interrupted training resumes from its last checkpoint in
``<runs>/<setting>/<unit>``, and a lock file keeps two processes off the same unit. ``--jobs N`` runs N units
at a time, each in its own process with ``--threads`` torch threads (default: the cores shared out) and its
output in ``<runs>/<setting>/<unit>.log``.

``--only`` takes ``SETTING/METHOD`` patterns (``*`` and ``?`` as in the shell; ``SETTING`` alone means every
unit of it); without it, ``run`` runs the 13 units of the CPU grid (the curve, its seeds and the GPU setting
run only when named). ``--scale F`` runs every named unit at F times its steps and examples (a smoke run of
the whole pipeline before it spends CPU-hours; keep its results apart with ``--results``).

Runs with ``--tag NAME`` (e.g. a learning-rate or aux-coefficient variant given by ``--set``) are scored on
the validation splits only and written as ``<method>@<tag>.json``: choices are made on validation data,
never on the test splits.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import fnmatch
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from experiments.data import TEST_SIZE, VAL_SIZE

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
SETTINGS = ("multitask", "single_arc-e", "single_agnews")
GPU_SETTINGS = ("multitask_10x",)  # run only when asked for (--only): hours per unit on a CPU, minutes on a GPU
METHODS = ("lora", "dora", "mixlora", "mixdora")
BASE = "base"  # the base model on the grid's tasks (multitask.yaml)
# The learning curve: configs/curve.yaml run at these optimizer steps (setting -> steps), the base model on its
# tasks (CURVE_BASE/none), and the longest length repeated with these further training seeds.
CURVE = {"curve_84": 84, "curve_280": 280, "curve_840": 840}
CURVE_BASE = "curve"
CURVE_SEEDS = (43, 44)
# Named groups of curve units for --only, in the order the plan runs them (the Makefile's curve targets).
CURVE_GROUPS = {
    "curve-core": ("curve", "curve_*/lora", "curve_*/mixlora"),
    "curve-seeds": ("curve_*/lora+seed*", "curve_*/mixlora+seed*"),
    "curve-dora": ("curve_*/dora", "curve_*/mixdora"),
    "curve-dora-seeds": ("curve_*/dora+seed*", "curve_*/mixdora+seed*"),
}
MODEL_LINK = Path("experiments/models/SmolLM2-135M-Instruct.Q4_1.gguf")
DATA_DIR = Path("experiments/data")
PROBES = "probes.json"  # under the results folder: ``probe``'s cost measurements, by unit


def config_path(setting: str) -> Path:
    """The run config a setting reads (``base``: multitask.yaml; the curve's lengths and base: curve.yaml)."""
    name = "multitask" if setting == BASE else CURVE_BASE if setting in CURVE or setting == CURVE_BASE else setting
    return CONFIGS / f"{name}.yaml"


def setting_tasks(setting: str) -> list[str]:
    """The tasks a setting is scored on (its config's ``data.eval``, in order)."""
    raw = yaml.safe_load(config_path(setting).read_text(encoding="utf-8"))
    return [d["task"] for d in raw["data"]["eval"]]


def base_unit(setting: str) -> str:
    """The unit that scores the base model on ``setting``'s tasks."""
    return f"{CURVE_BASE if config_path(setting).stem == CURVE_BASE else BASE}/none"


@dataclass(frozen=True)
class Unit:
    """One result: ``method`` trained on ``setting`` (method ``none``: the base model, no training), with the
    config's training seed unless ``seed`` is given."""

    setting: str
    method: str
    tag: str | None = None
    seed: int | None = None

    @property
    def variant(self) -> str:
        """The unit within its setting: ``mixlora``, ``mixlora+seed43``."""
        return self.method + (f"+seed{self.seed}" if self.seed is not None else "")

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.variant}" + (f"@{self.tag}" if self.tag else "")

    @property
    def config(self) -> Path:
        return config_path(self.setting)

    @property
    def steps(self) -> int | None:
        """The optimizer steps a curve length runs the recipe at (None: the config's own)."""
        return CURVE.get(self.setting)

    def result_path(self, results: Path) -> Path:
        return results / self.setting / f"{self.variant}{'@' + self.tag if self.tag else ''}.json"

    def output_dir(self, runs: Path) -> Path:
        return runs / self.setting / (self.variant + (f"@{self.tag}" if self.tag else ""))

    def log_path(self, runs: Path) -> Path:
        return self.output_dir(runs).with_name(self.output_dir(runs).name + ".log")


def all_units(tag: str | None = None) -> list[Unit]:
    """The grid (base model, three settings), the GPU setting, and the curve (base model, lengths, seeds)."""
    base = [] if tag else [Unit(BASE, "none")]
    grid = base + [Unit(s, m, tag) for s in SETTINGS + GPU_SETTINGS for m in METHODS]
    curve = ([] if tag else [Unit(CURVE_BASE, "none")]) + [Unit(s, m, tag) for s in CURVE for m in METHODS]
    longest = max(CURVE, key=CURVE.__getitem__)
    return grid + curve + [Unit(longest, m, tag, seed) for seed in CURVE_SEEDS for m in METHODS]


def select(only: list[str], tag: str | None = None) -> list[Unit]:
    """The units whose ``setting/variant`` matches one of the ``only`` patterns (shell wildcards; a pattern
    without ``/`` names whole settings; a ``CURVE_GROUPS`` name stands for its patterns), in pattern order;
    when ``only`` is empty, those of the CPU grid."""
    units = all_units(tag)
    if not only:
        return [u for u in units if u.setting in (BASE, *SETTINGS)]
    chosen = []
    for pattern in [p for name in only for p in CURVE_GROUPS.get(name, (name,))]:
        full = pattern if "/" in pattern else f"{pattern}/*"
        hits = [u for u in units if fnmatch.fnmatchcase(f"{u.setting}/{u.variant}", full)]
        if not hits:
            raise SystemExit(f"experiments.run: no unit matches {pattern!r} (units: "
                             f"{', '.join(u.name for u in units)})")
        chosen += [u for u in hits if u not in chosen]
    return chosen


# ---- one unit -------------------------------------------------------------------------------------------------
def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def budget_rows(config: Path, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """``loramix params``' rows by method for a setting: trainable parameters, share, and the LoRA/DoRA rank that
    matches the MixLoRA/MixDoRA budget (unless the config fixes ``adapter.lora_r``), with the alpha that keeps
    the mixture's alpha/r."""
    from loramix.training.methods import budget_table, method_spec
    from loramix.io.base_model import load_config
    from loramix.runconfig import load_run_config

    cfg = load_run_config(str(config), overrides)
    spec = method_spec({k: v for k, v in cfg.adapter.items() if k != "type"})
    rows = {r["method"]: r for r in budget_table(load_config(cfg.model), spec)}
    for method in ("lora", "dora"):
        rows[method]["lora_alpha"] = spec.config.lora_alpha / spec.config.r * rows[method]["rank"]
    return rows


def method_overrides(method: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    """``--set`` items that select ``method``; LoRA/DoRA also get their rank and alpha from ``rows``."""
    sets = [f"adapter.method={method}"]
    if method in ("lora", "dora"):
        sets += [f"adapter.lora_r={rows[method]['rank']}", f"adapter.lora_alpha={rows[method]['lora_alpha']:g}"]
    return sets


def training_tokens(cfg, tokenizer) -> dict[str, int]:
    """Non-pad tokens the trainer processed (its own data order: ``make_plan`` and ``Plan.micro_batch``)."""
    from loramix.data import IGNORE_INDEX, Encoder, load_mixture
    from loramix.training.trainer import make_plan

    t = cfg.train
    specs = [dataclasses.replace(s, template=s.template or cfg.data.template) for s in cfg.data.datasets]
    enc = Encoder(tokenizer, cutoff_len=cfg.data.cutoff_len, train_on_inputs=cfg.data.train_on_inputs,
                  add_eos=cfg.data.add_eos)
    feats = [f for f in map(enc.encode_train, load_mixture(specs, seed=t.seed))
             if any(x != IGNORE_INDEX for x in f["labels"][1:])]
    plan = make_plan(len(feats), t)
    micro = range(plan.total_steps * t.gradient_accumulation_steps)
    seen = [i for m in micro for i in plan.micro_batch(m, t.micro_batch_size, t.seed)]
    return {"examples": len(seen), "tokens": sum(len(feats[i]["input_ids"]) for i in seen)}


def read_log(path: Path) -> dict[str, Any]:
    """Loss curve (last record per step), and the training time summed over sessions (``elapsed_s`` restarts
    at 0 when a run resumes)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_step, wall, sessions, last = {}, 0.0, 0, None
    for r in records:
        if last is None or r["elapsed_s"] < last:
            sessions += 1
            wall += last or 0.0
        last = r["elapsed_s"]
        by_step[r["step"]] = r
    wall += last or 0.0
    steps = sorted(by_step)
    return {"steps": steps[-1] if steps else 0, "wall_s": round(wall, 1), "sessions": sessions,
            "loss": [[s, by_step[s]["loss"], by_step[s]["aux_loss"]] for s in steps]}


def _eval_specs(cfg, split: str, limit: int | None = None):
    """The config's ``data.eval`` datasets (test), or the same tasks' held-out ``val.jsonl`` files."""
    out = []
    for s in cfg.data.eval:
        path = s.path if split == "test" else str(Path(s.path).with_name("val.jsonl"))
        out.append(dataclasses.replace(s, path=path, template=s.template or cfg.data.template,
                                       limit=limit if limit is not None else s.limit))
    return out


def evaluate(model, tokenizer, cfg, split: str) -> dict[str, dict[str, Any]]:
    """Per task: ``n``, ``label_acc``, ``loglik_acc`` (as ``loramix eval``) and each example's hits as strings of
    0/1 (``label_correct``, ``loglik_correct``, in file order) for paired comparisons between methods."""
    from loramix.data import Encoder, load_examples
    from loramix.evaluation.accuracy import predict

    examples = [e for s in _eval_specs(cfg, split) for e in load_examples(s)]
    preds = predict(model, Encoder(tokenizer), examples, batch_size=cfg.train.eval_batch_size,
                    max_len=cfg.data.cutoff_len)
    out: dict[str, dict[str, Any]] = {}
    for p in preds:
        r = out.setdefault(p.example.task, {"label_correct": "", "loglik_correct": ""})
        r["label_correct"] += "01"[p.label_pred == p.example.label]
        r["loglik_correct"] += "01"[p.loglik_pred == p.example.label]
    for r in out.values():
        n = len(r["label_correct"])
        r.update(n=n, label_acc=r["label_correct"].count("1") / n, loglik_acc=r["loglik_correct"].count("1") / n)
    return out


def router_load(model, tokenizer, cfg, limit: int) -> dict[str, Any]:
    """``loramix inspect``'s statistics on the first ``limit`` validation examples of each task."""
    from loramix.data import Encoder, load_examples
    from loramix.evaluation.router_stats import router_statistics

    examples = [e for s in _eval_specs(cfg, "val", limit) for e in load_examples(s)]
    return router_statistics(model, Encoder(tokenizer, cutoff_len=cfg.data.cutoff_len), examples,
                             batch_size=cfg.train.eval_batch_size)


def _command(*parts: str) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def schedule_overrides(unit: Unit, config: str, overrides: list[str], scale: Fraction = Fraction(1)) -> list[str]:
    """``--set`` items for what ``unit`` changes in ``config`` (after ``overrides``): its seed, and its length.

    A curve length, or ``scale`` != 1, runs the config at that share of its optimizer steps with its warmup
    steps and every dataset's ``samples`` scaled alike (rounded up, at least 1), so a shorter run is one pass
    over proportionally fewer examples with the same schedule (a ``warmup_ratio`` scales by itself)."""
    from loramix.runconfig import load_run_config

    sets = [f"train.seed={unit.seed}"] if unit.seed is not None else []
    if unit.method == "none" or (unit.steps is None and scale == 1):
        return sets
    cfg = load_run_config(config, overrides)
    if not cfg.train.max_steps:
        raise SystemExit(f"experiments.run: {config} sets no train.max_steps to scale")
    factor = scale * Fraction(unit.steps or cfg.train.max_steps, cfg.train.max_steps)
    if factor == 1:
        return sets
    scaled = lambda n: max(1, math.ceil(n * factor))  # noqa: E731
    sets.append(f"train.max_steps={scaled(cfg.train.max_steps)}")
    if cfg.train.warmup_steps:
        sets.append(f"train.warmup_steps={scaled(cfg.train.warmup_steps)}")
    return sets + [f"data.datasets.{i}.samples={scaled(d.samples)}" for i, d in enumerate(cfg.data.datasets)
                   if d.samples is not None]


@contextlib.contextmanager
def unit_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``path`` while the block runs; yield False (holding nothing) when
    another process holds it. The system releases it when the holder exits, however it exits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _machine(load_before: list[float]) -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "loadavg_start": load_before, "loadavg_end": _loadavg()}


@dataclass
class Runner:
    """Runs units into ``results`` (JSON) and ``runs`` (training folders); ``overrides`` go to every config,
    ``scale`` to every unit's length."""

    results: Path = Path("experiments/results")
    runs: Path = Path("experiments/runs")
    overrides: list[str] = dataclasses.field(default_factory=list)
    threads: int | None = None
    router_examples: int = 50
    scale: Fraction = Fraction(1)
    echo: Callable[[str], None] = print
    _budgets: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def budget(self, config: str) -> dict[str, dict[str, Any]]:
        if config not in self._budgets:
            self._budgets[config] = budget_rows(Path(config), self.overrides)
        return self._budgets[config]

    def _setup(self, unit: Unit, run_dir: Path | None) -> tuple[str, list[str]]:
        """The unit's config (relative to the working directory when inside it) and its ``--set`` items."""
        import torch

        from loramix.commands.common import quiet_transformers

        if self.threads:
            torch.set_num_threads(self.threads)
        quiet_transformers()
        config = os.path.relpath(unit.config) if unit.config.is_relative_to(Path.cwd()) else str(unit.config)
        sets = [*self.overrides, *schedule_overrides(unit, config, self.overrides, self.scale)]
        if run_dir is not None:
            sets += [f"train.output_dir={run_dir}", *method_overrides(unit.method, self.budget(config))]
        return config, sets

    def run(self, unit: Unit) -> Path | None:
        """Run ``unit`` unless its JSON exists; return the JSON path (None: another process is running it)."""
        out = unit.result_path(self.results)
        if out.exists():
            self.echo(f"[{unit.name}] done already: {out}")
            return out
        lock = unit.output_dir(self.runs).with_name(f".{unit.output_dir(self.runs).name}.unit.lock")  # not the run's own lock
        with unit_lock(lock) as held:
            if not held:
                self.echo(f"[{unit.name}] another process is running it (lock {lock}); skipped")
                return None
            if not out.exists():  # it may have finished while we waited for the lock
                self._run(unit, out)
        return out

    def _run(self, unit: Unit, out: Path) -> None:
        import torch

        from loramix.cli import main as loramix_main
        from loramix.loading import load_model
        from loramix.runconfig import load_run_config

        started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), _loadavg()
        t_start, cpu_start = time.time(), time.process_time()
        run_dir = unit.output_dir(self.runs) if unit.method != "none" else None
        config, sets = self._setup(unit, run_dir)
        record: dict[str, Any] = {"unit": unit.name, "setting": unit.setting, "method": unit.method, "tag": unit.tag,
                                  "seed": unit.seed, "config": config}
        if self.scale != 1:
            record["scale"] = str(self.scale)
        adapter_dir = None
        if run_dir is not None:
            rows = self.budget(config)
            record["params"] = {k: rows[unit.method][k] for k in ("rank", "trainable", "total", "share")}
            adapter_dir = run_dir / "adapter"
            train_cmd = ["train", config, *[x for s in sets for x in ("--set", s)]]
            if not adapter_dir.is_dir():
                resume = ["--resume"] if run_dir.exists() else []
                self.echo(f"[{unit.name}] loramix {_command(*train_cmd, *resume)}")
                if loramix_main([*train_cmd, *resume]) != 0:
                    raise SystemExit(f"[{unit.name}] training failed")
            record["commands"] = {"train": "loramix " + _command(*train_cmd)}
        cfg = load_run_config(config, sets)
        record["overrides"] = sets
        record["resolved_config"] = cfg.to_dict()
        eval_sets = [x for s in sets for x in ("--set", s)]
        record.setdefault("commands", {})["eval"] = "loramix " + _command(
            "eval", "--config", config, *eval_sets, *(["--adapter", "none"] if adapter_dir is None else []))
        if unit.method.startswith("mix"):
            record["commands"]["inspect"] = "loramix " + _command("inspect", "--config", config, *eval_sets)

        t_score = time.time()
        model, tokenizer = load_model(cfg.model, None if adapter_dir is None else str(adapter_dir))  # on the GPU if any
        if adapter_dir is not None:
            log = read_log(Path(cfg.train.output_dir) / "log.jsonl")
            tokens = training_tokens(cfg, tokenizer)
            record["train"] = {**log, **tokens, "tokens_per_s": round(tokens["tokens"] / max(log["wall_s"], 1e-9), 1)}
        t0 = time.time()
        record["eval"] = {"val": evaluate(model, tokenizer, cfg, "val")}
        if not unit.tag:
            record["eval"]["test"] = evaluate(model, tokenizer, cfg, "test")
        record["eval"]["wall_s"] = round(time.time() - t0, 1)
        if unit.method.startswith("mix"):
            record["router"] = router_load(model, tokenizer, cfg, self.router_examples)
        record["machine"] = _machine(load_before)
        train_s = record.get("train", {}).get("wall_s")
        record["cost"] = {"train_s": train_s,  # the training loop, summed over the sessions it took
                          "s_per_step": round(train_s / record["train"]["steps"], 2) if train_s else None,
                          "score_s": round(time.time() - t_score, 1),  # loading, scoring, router load
                          "session_s": round(time.time() - t_start, 1),  # this call, training in it included
                          "cpu_s": round(time.process_time() - cpu_start, 1),  # this process's CPU time in it
                          "threads": torch.get_num_threads()}
        record["started"], record["finished"] = started, time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_json(out, record)
        self.echo(f"[{unit.name}] wrote {out}")

    def probe(self, unit: Unit, steps: int, eval_items: int) -> dict[str, Any]:
        """Time ``steps`` optimizer steps of ``unit``'s training (in a scratch folder under ``runs``, deleted
        afterwards) and the scoring of ``eval_items`` validation items per task: ``s_per_step`` (the first
        step, which allocates, left out), ``items_per_s``, ``load_s`` (loading the trained model), the CPU
        share of each, and ``tokens_per_step`` (non-pad training tokens per step of the whole unit)."""
        from loramix.cli import main as loramix_main
        from loramix.data import Encoder, load_examples
        from loramix.evaluation.accuracy import predict
        from loramix.loading import load_model
        from loramix.runconfig import load_run_config

        if steps < 2:
            raise SystemExit("experiments.run probe: --steps must be at least 2 (the first step is left out)")
        load_before = _loadavg()
        self.runs.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="probe-", dir=self.runs))
        try:
            config, unit_sets = self._setup(unit, scratch / "run")
            sets = [*unit_sets, f"train.max_steps={steps}", "train.save_steps=0", "train.logging_steps=1"]
            wall, cpu = time.time(), time.process_time()
            if loramix_main(["train", config, *[x for s in sets for x in ("--set", s)]]) != 0:
                raise SystemExit(f"[{unit.name}] probe training failed")
            train_share = (time.process_time() - cpu) / (time.time() - wall)
            cfg, whole = load_run_config(config, sets), load_run_config(config, unit_sets)
            elapsed = [r["elapsed_s"] for r in map(json.loads, (scratch / "run" / "log.jsonl").read_text(
                encoding="utf-8").splitlines())]
            t0 = time.time()
            model, tokenizer = load_model(cfg.model, str(scratch / "run" / "adapter"))
            examples = [e for s in _eval_specs(cfg, "val", eval_items) for e in load_examples(s)]
            t1, cpu = time.time(), time.process_time()
            predict(model, Encoder(tokenizer), examples, batch_size=cfg.train.eval_batch_size,
                    max_len=cfg.data.cutoff_len)
            t2, score_share = time.time(), (time.process_time() - cpu) / (time.time() - t1)
            tokens = training_tokens(whole, tokenizer)["tokens"] / whole.train.max_steps  # the whole unit's, per step
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        s_per_step = (elapsed[-1] - elapsed[0]) / (steps - 1)
        # The CPU share (process CPU time / wall time) tells how much of a core the busy machine gave us:
        # times x share are what an otherwise idle core would take, roughly (the share of training includes
        # its loading).
        return {"unit": unit.name, "method": unit.method, "steps": steps, "s_per_step": round(s_per_step, 2),
                "train_cpu_share": round(train_share, 3), "tokens_per_step": round(tokens, 1),
                "load_s": round(t1 - t0, 1), "items": len(examples),
                "items_per_s": round(len(examples) / (t2 - t1), 2), "score_cpu_share": round(score_share, 3),
                "machine": _machine(load_before), "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_parallel(units: list[Unit], child_args: list[str], *, jobs: int, results: Path, runs: Path,
                 echo: Callable[[str], None] = print, poll_s: float = 1.0) -> int:
    """Run ``units`` ``jobs`` at a time, each as ``python -m experiments.run run --only UNIT *child_args`` in its
    own process with its output in ``Unit.log_path``; return how many failed. Stopping this process stops them
    (each resumes from its last checkpoint when run again)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    pending, running, failed = [], {}, 0
    for unit in units:
        if unit.result_path(results).exists():
            echo(f"[{unit.name}] done already: {unit.result_path(results)}")
        else:
            pending.append(unit)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                unit = pending.pop(0)
                log_path = unit.log_path(runs)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(log_path, "a", encoding="utf-8")
                cmd = [sys.executable, "-m", "experiments.run", "run", "--only", f"{unit.setting}/{unit.variant}",
                       *child_args]
                running[unit] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
                echo(f"[{unit.name}] started (pid {running[unit][0].pid}, output in {log_path})")
            time.sleep(poll_s)
            for unit, (proc, log, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[unit]
                minutes = (time.time() - t0) / 60
                if proc.returncode == 0 and unit.result_path(results).exists():
                    echo(f"[{unit.name}] finished in {minutes:.1f} min")
                elif proc.returncode == 0:
                    echo(f"[{unit.name}] skipped: another process is running it (see {unit.log_path(runs)})")
                else:
                    failed += 1
                    echo(f"[{unit.name}] FAILED (exit {proc.returncode}) after {minutes:.1f} min; see "
                         f"{unit.log_path(runs)}")
    finally:
        for proc, log, _ in running.values():
            proc.terminate()
            proc.wait()
            log.close()
    return failed


def prepare(*, data_dir: Path = DATA_DIR, model_link: Path | None = MODEL_LINK, **sizes) -> dict:
    """Write the data splits (experiments.data) and link ``model_link`` to the installed SmolLM2 .gguf file."""
    from experiments.data import prepare as prepare_data

    counts = prepare_data(data_dir, **sizes)
    if model_link is not None:
        from loramix.tools.demo import smollm2_path

        target = smollm2_path()
        model_link.parent.mkdir(parents=True, exist_ok=True)
        if model_link.is_symlink() or model_link.exists():
            model_link.unlink()
        model_link.symlink_to(target)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="write experiments/data and link the SmolLM2 model")
    pp.add_argument("--val-size", type=int, default=VAL_SIZE, help="validation items per task (default %(default)s)")
    pp.add_argument("--test-size", type=int, default=TEST_SIZE, help="test items per task (default %(default)s)")
    pp.add_argument("--no-model", action="store_true", help="do not link the SmolLM2 .gguf (another base via --set)")
    for name, text in (("run", "run the units"), ("list", "show each unit's status"),
                       ("probe", "time a few training steps and some scoring of the units")):
        q = sub.add_parser(name, help=text)
        q.add_argument("--only", action="append", default=[], metavar="SETTING/METHOD",
                       help="units, e.g. multitask/mixlora, 'single_arc-e/*', 'curve_*/lora', base (default: the grid)")
        q.add_argument("--tag", help="a variant name: results go to METHOD@TAG.json, scored on validation only")
        q.add_argument("--results", type=Path, default=Path("experiments/results"))
    for name in ("run", "probe"):
        q = sub.choices[name]
        q.add_argument("--runs", type=Path, default=Path("experiments/runs"))
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of every config")
        q.add_argument("--threads", type=int, help="torch threads (default: torch's; with --jobs, the cores shared out)")
        q.add_argument("--scale", type=Fraction, default=Fraction(1),
                       help="run at this share of every unit's steps and examples (a smoke run; default 1)")
    rp = sub.choices["run"]
    rp.add_argument("--router-examples", type=int, default=50, help="validation examples per task for router load")
    rp.add_argument("--jobs", type=int, default=1, help="units at a time, each in its own process (default 1)")
    probe = sub.choices["probe"]
    probe.add_argument("--steps", type=int, default=6, help="optimizer steps to time (default %(default)s)")
    probe.add_argument("--eval-items", type=int, default=32, help="validation items per task to score (default %(default)s)")
    ap = sub.add_parser("report", help="assemble docs/results.md from the result JSONs")
    ap.add_argument("--results", type=Path, default=Path("experiments/results"))
    ap.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    args = p.parse_args(argv)
    if getattr(args, "scale", 1) <= 0 or getattr(args, "jobs", 1) < 1:
        p.error("--scale must be positive and --jobs at least 1")

    if args.command == "prepare":
        counts = prepare(model_link=None if args.no_model else MODEL_LINK, val_size=args.val_size,
                         test_size=args.test_size)
        for task, n in counts.items():
            print(f"{task:<8} " + "  ".join(f"{k} {v}" for k, v in n.items()))
        return 0
    if args.command == "report":
        from experiments.report import write_report

        print(f"wrote {write_report(args.results, args.doc)}")
        return 0
    units = select(args.only, args.tag)
    if args.command == "list":
        for u in units if args.only else all_units(args.tag):
            print(f"{u.name:<28} {'done' if u.result_path(args.results).exists() else 'not yet run'}")
        return 0
    if args.command == "run" and args.jobs > 1:
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        child = ["--results", str(args.results), "--runs", str(args.runs), "--threads", str(threads),
                 "--router-examples", str(args.router_examples), "--scale", str(args.scale),
                 *(["--tag", args.tag] if args.tag else []), *[x for s in args.set for x in ("--set", s)]]
        return int(run_parallel(units, child, jobs=args.jobs, results=args.results, runs=args.runs) > 0)
    runner = Runner(results=args.results, runs=args.runs, overrides=args.set, threads=args.threads,
                    scale=args.scale, router_examples=getattr(args, "router_examples", Runner.router_examples))
    if args.command == "probe":
        path = args.results / PROBES
        probes = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        for unit in units:
            probes[unit.name] = runner.probe(unit, args.steps, args.eval_items)
            print(f"[{unit.name}] {probes[unit.name]['s_per_step']} s/step, {probes[unit.name]['items_per_s']} "
                  f"scored items/s, load avg {probes[unit.name]['machine']['loadavg_start']}")
            _write_json(path, probes)
        return 0
    for unit in units:
        runner.run(unit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
