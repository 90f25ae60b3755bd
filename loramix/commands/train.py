"""``loramix train CONFIG.yaml [--set key=value ...] [--resume]``."""
from __future__ import annotations

import argparse

from .common import quiet_transformers


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model with MixLoRA from a YAML run config",
                              description="Fine-tune from a YAML run config (see docs/cli.md for the schema).")
    p.add_argument("config", help="the run config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training.distributed import end_processes
    from ..runconfig import load_run_config
    from ..training.trainer import train

    cfg = load_run_config(args.config, args.set)
    quiet_transformers()
    try:
        train(cfg, resume=args.resume)
    finally:
        end_processes()
    return 0
