"""``loramix params CONFIG``: trainable parameters and their share of the model for LoRA, DoRA, MixLoRA and
MixDoRA built from the config's adapter section, with the LoRA/DoRA rank that matches the mixtures' budget
(unless ``adapter.lora_r`` fixes it). Counted on a meta-device build of the base: no weights are loaded.
For LLaMA-shaped bases, also the MixLoRA training memory per GPU at the config's micro-batch and cutoff
length, bf16 against the config's quantisation (nf4 when it has none), with and without gradient
checkpointing, from loramix.tools.memory (docs/quantization.md)."""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..errors import LoramixError
from .common import quiet_transformers


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
    quiet_transformers()
    adapter = dict(cfg.adapter)
    if adapter.pop("type", "mixlora") != "mixlora":
        raise LoramixError(f"{args.config}: adapter.type must be mixlora (MixLoRA keys) to compare the methods")
    spec = method_spec(adapter)
    model = dataclasses.replace(cfg.model, name_or_path=args.model, gguf_file=None) if args.model else cfg.model
    name = model.name_or_path
    hf_config = load_config(model)
    rows = budget_table(hf_config, spec)
    memory = memory_rows(hf_config, spec.config, cfg)
    if args.json:
        print(json.dumps({"model": name, "rows": rows, "memory": memory}, indent=2))
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
    print_memory(memory, cfg)
    return 0


def memory_rows(hf_config, config, cfg) -> list[dict]:
    """MixLoRA's memory per GPU in bytes (loramix.tools.memory.estimate) for bf16 weights and the config's
    quantisation (nf4 without one), each without and with checkpointing; [] for a base of another shape."""
    from ..tools.memory import Shape, estimate

    shape = Shape.from_hf_config(hf_config)
    if shape is None:
        return []
    quantization = cfg.model.quantization or "nf4"
    double_quant = cfg.model.double_quant if cfg.model.quantization else False
    rows = []
    for weights in (None, quantization):
        for checkpointing in (False, True):
            e = estimate(shape, batch=cfg.train.micro_batch_size, seq=cfg.data.cutoff_len, r=config.expert_value("r"),
                         experts=config.num_experts, top_k=config.top_k or config.num_experts,
                         dropout=config.lora_dropout > 0, checkpointing=checkpointing, quantization=weights,
                         double_quant=double_quant and weights is not None)
            rows.append({"base": weights or "bf16", "double_quant": double_quant and weights is not None,
                         "checkpointing": checkpointing, **dataclasses.asdict(e), "total": e.total})
    return rows


def print_memory(rows: list[dict], cfg) -> None:
    from ..tools.memory import GIB

    if not rows:
        print("memory: the planner covers LLaMA-shaped bases (gated FFN, q/k/v/o) only")
        return
    print(f"\nMixLoRA training memory per GPU, GiB (micro-batch {cfg.train.micro_batch_size} x "
          f"{cfg.data.cutoff_len} tokens; loramix.tools.memory, docs/quantization.md):")
    print(f"{'base':<10}{'checkpointing':>14}{'frozen':>9}{'adapter+grad+adam':>19}{'activations':>13}"
          f"{'other':>8}{'total':>8}")
    for row in rows:
        gib = {key: value / GIB for key, value in row.items() if isinstance(value, int) and not isinstance(value, bool)}
        trained = gib["adapter"] + gib["gradients"] + gib["optimizer"]
        other = gib["logits"] + gib["dequantized"] + gib["ddp_buckets"]
        base = row["base"] + ("+dq" if row["double_quant"] else "")
        print(f"{base:<10}{'on' if row['checkpointing'] else 'off':>14}{gib['weights']:>9.2f}"
              f"{trained:>19.2f}{gib['activations']:>13.2f}{other:>8.2f}{gib['total']:>8.2f}")

