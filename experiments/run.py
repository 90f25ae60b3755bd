"""The LoRA / DoRA / MixLoRA / MixDoRA comparison, one resumable unit per (setting, method).

    python -m experiments.run prepare                     # data splits + link to the SmolLM2 .gguf
    python -m experiments.run run [--only multitask/mixlora ...] [--threads N] [--set KEY=VALUE ...]
    python -m experiments.run report                      # docs/results.md from experiments/results/*.json
    python -m experiments.run list                        # which units are done

A setting is a run config in ``experiments/configs`` (``multitask``, ``single_arc-e``, ``single_agnews``);
a unit trains one method on it with ``loramix train CONFIG --set adapter.method=M ...`` (the same data, steps,
schedule and seed for every method; LoRA/DoRA at the rank that matches the MixLoRA/MixDoRA budget, with the
same alpha/r), then scores the adapter on the test and validation splits and, for the mixtures, records the
router load per task. Unit ``base/none`` scores the base model alone. Each unit writes
``<results>/<setting>/<method>.json`` when it has finished; a unit whose JSON exists is skipped, and an
interrupted training resumes from its last checkpoint in ``<runs>/<setting>/<method>``.

Runs with ``--tag NAME`` (e.g. a learning-rate or aux-coefficient variant given by ``--set``) are scored on
the validation splits only and written as ``<method>@<tag>.json``: choices are made on validation data,
never on the test splits.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from experiments.data import TEST_SIZE, VAL_SIZE

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
SETTINGS = ("multitask", "single_arc-e", "single_agnews")
GPU_SETTINGS = ("multitask_10x",)  # run only when asked for (--only): hours per unit on a CPU, minutes on a GPU
METHODS = ("lora", "dora", "mixlora", "mixdora")
BASE = "base"
MODEL_LINK = Path("experiments/models/SmolLM2-135M-Instruct.Q4_1.gguf")
DATA_DIR = Path("experiments/data")


@dataclass(frozen=True)
class Unit:
    """One result: ``method`` trained on ``setting`` (``base``/``none``: the base model, no training)."""

    setting: str
    method: str
    tag: str | None = None

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.method}" + (f"@{self.tag}" if self.tag else "")

    @property
    def config(self) -> Path:
        return CONFIGS / f"{'multitask' if self.setting == BASE else self.setting}.yaml"

    def result_path(self, results: Path) -> Path:
        return results / self.setting / f"{self.method}{'@' + self.tag if self.tag else ''}.json"

    def output_dir(self, runs: Path) -> Path:
        return runs / self.setting / (self.method + (f"@{self.tag}" if self.tag else ""))


def all_units(tag: str | None = None) -> list[Unit]:
    base = [] if tag else [Unit(BASE, "none")]
    return base + [Unit(s, m, tag) for s in SETTINGS + GPU_SETTINGS for m in METHODS]


def select(only: list[str], tag: str | None = None) -> list[Unit]:
    """The units named ``setting/method`` (either part may be ``*``); when ``only`` is empty, those of every
    setting but the GPU ones."""
    units = all_units(tag)
    if not only:
        return [u for u in units if u.setting not in GPU_SETTINGS]
    chosen = []
    for pattern in only:
        setting, _, method = pattern.partition("/")
        hits = [u for u in units if setting in ("*", u.setting) and (method or "*") in ("*", u.method)]
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


@dataclass
class Runner:
    """Runs units into ``results`` (JSON) and ``runs`` (training folders); ``overrides`` go to every config."""

    results: Path = Path("experiments/results")
    runs: Path = Path("experiments/runs")
    overrides: list[str] = dataclasses.field(default_factory=list)
    threads: int | None = None
    router_examples: int = 50
    echo: Callable[[str], None] = print
    _budgets: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def budget(self, config: str) -> dict[str, dict[str, Any]]:
        if config not in self._budgets:
            self._budgets[config] = budget_rows(Path(config), self.overrides)
        return self._budgets[config]

    def run(self, unit: Unit) -> Path:
        """Run ``unit`` unless its JSON exists; return the JSON path."""
        out = unit.result_path(self.results)
        if out.exists():
            self.echo(f"[{unit.name}] done already: {out}")
            return out
        import torch

        from loramix.cli import main as loramix_main
        from loramix.commands.common import quiet_transformers
        from loramix.loading import load_model
        from loramix.runconfig import load_run_config

        if self.threads:
            torch.set_num_threads(self.threads)
        quiet_transformers()
        started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), _loadavg()
        config = os.path.relpath(unit.config) if unit.config.is_relative_to(Path.cwd()) else str(unit.config)
        record: dict[str, Any] = {"unit": unit.name, "setting": unit.setting, "method": unit.method, "tag": unit.tag,
                                  "config": config}
        sets = list(self.overrides)
        adapter_dir = None
        if unit.setting != BASE:
            run_dir = unit.output_dir(self.runs)
            rows = self.budget(config)
            sets += [f"train.output_dir={run_dir}", *method_overrides(unit.method, rows)]
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
        record["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0],
                             "torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                             "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                             "loadavg_start": load_before, "loadavg_end": _loadavg()}
        record["started"], record["finished"] = started, time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_json(out, record)
        self.echo(f"[{unit.name}] wrote {out}")
        return out


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
    for name in ("run", "list"):
        q = sub.add_parser(name, help="run the units" if name == "run" else "show each unit's status")
        q.add_argument("--only", action="append", default=[], metavar="SETTING/METHOD",
                       help="units to run, e.g. multitask/mixlora, 'single_arc-e/*', base (default: all)")
        q.add_argument("--tag", help="a variant name: results go to METHOD@TAG.json, scored on validation only")
        q.add_argument("--results", type=Path, default=Path("experiments/results"))
    rp = sub.choices["run"]
    rp.add_argument("--runs", type=Path, default=Path("experiments/runs"))
    rp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of every config")
    rp.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a busy machine)")
    rp.add_argument("--router-examples", type=int, default=50, help="validation examples per task for router load")
    ap = sub.add_parser("report", help="assemble docs/results.md from the result JSONs")
    ap.add_argument("--results", type=Path, default=Path("experiments/results"))
    ap.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    args = p.parse_args(argv)

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
    runner = Runner(results=args.results, runs=args.runs, overrides=args.set, threads=args.threads,
                    router_examples=args.router_examples)
    for unit in units:
        runner.run(unit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
