"""``loramix train CONFIG.yaml [--set key=value ...] [--resume]``."""
from __future__ import annotations

import argparse
import shlex

from .common import quiet_transformers


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model with MixLoRA from a YAML run config",
                              description="Fine-tune from a YAML run config (see docs/cli.md for the schema).")
    p.add_argument("config", help="the run config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    p.set_defaults(run=run)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run."""
    sets = [word for assignment in args.set for word in ("--set", assignment)]
    return shlex.join(["loramix", "train", args.config, *sets, "--resume"])


def run(args: argparse.Namespace) -> int:
    from ..data.sources import check_dataset
    from ..io.base_model import check_model_files
    from ..runconfig import load_run_config
    from ..training.distributed import end_processes
    from ..training.trainer import train

    # Everything cheap first, every problem at once: the config, the model's files, each dataset's first records.
    cfg = load_run_config(args.config, args.set, check_model=check_model_files, check_dataset=check_dataset)
    quiet_transformers()
    try:
        train(cfg, resume=args.resume, resume_command=resume_command(args))
    finally:
        end_processes()
    return 0
