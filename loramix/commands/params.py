"""``loramix params CONFIG``: trainable parameters and their share of the model for LoRA, DoRA, MixLoRA and
MixDoRA built from the config's adapter section, with the LoRA/DoRA rank that matches the mixtures' budget
(unless ``adapter.lora_r`` fixes it). Counted on a meta-device build of the base: no weights are loaded."""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..errors import LoramixError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("params", help="trainable parameters of lora/dora/mixlora/mixdora, budget-matched rank",
                              description=__doc__)
    p.add_argument("config", help="a run config (YAML) with model and adapter sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--model", help="base model folder, .gguf file or hub id (default: the config's model.name_or_path)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training.methods import budget_table, method_spec
    from ..io.base_model import load_config
    from ..runconfig import load_run_config

    cfg = load_run_config(args.config, args.set)
    adapter = dict(cfg.adapter)
    if adapter.pop("type", "mixlora") != "mixlora":
        raise LoramixError(f"{args.config}: adapter.type must be mixlora (MixLoRA keys) to compare the methods")
    spec = method_spec(adapter)
    model = dataclasses.replace(cfg.model, name_or_path=args.model, gguf_file=None) if args.model else cfg.model
    name = model.name_or_path
    rows = budget_table(load_config(model), spec)
    if args.json:
        print(json.dumps({"model": name, "rows": rows}, indent=2))
        return 0
    c = spec.config
    routing = {"top_k": f"top-{c.top_k}", "top_p": f"top-p {c.top_p}", "switch": "switch"}[c.routing]
    mixture = f"{c.num_experts} experts, {routing}"
    print(f"base model: {name} ({rows[0]['total'] - rows[0]['trainable']:,d} parameters)")
    print(f"{'method':<9}{'rank':>6}  {'trainable':>14}  {'share':>8}  note")
    for row in rows:
        note = mixture if row["method"].startswith("mix") else ""
        if "matches" in row:
            note = f"largest rank within the {row['matches']} budget"
        print(f"{row['method']:<9}{row['rank']:>6}  {row['trainable']:>14,d}  {100 * row['share']:>7.3f}%  {note}")
    return 0

