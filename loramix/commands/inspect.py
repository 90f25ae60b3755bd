"""``loramix inspect``: what the routers learned, per layer, expert and task (JSON + heatmap PNG)."""
from __future__ import annotations

import argparse
import json
import os

from .common import add_data_args, add_model_args, scoring_setup


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="router statistics of a MixLoRA adapter, per layer/expert/task",
                              description="Share of tokens routed to each expert and routing entropy, per layer "
                                          "and task; writes router_stats.json and router_heatmap.png.")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--output-dir", default=".", help="where to write router_stats.json and router_heatmap.png")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.router_stats import format_summary, plot_heatmap, router_statistics

    job = scoring_setup(args)
    stats = router_statistics(job.model, job.encoder, job.examples, batch_size=job.batch_size)
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "router_stats.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"adapter": job.adapter, **stats}, f, indent=2)
    png_path = os.path.join(args.output_dir, "router_heatmap.png")
    plot_heatmap(stats, png_path)
    print(format_summary(stats))
    print(f"wrote {json_path} and {png_path}")
    return 0
