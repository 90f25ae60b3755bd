"""``loramix eval``: accuracy per task for a MixLoRA adapter, a PEFT LoRA adapter or the bare model."""
from __future__ import annotations

import argparse

from .common import add_data_args, add_model_args, scoring_setup


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="accuracy on commonsense / classification tasks",
                              description="Score each task by the label token at the last prompt position and "
                                          "by the log-likelihood of each choice; print a table, write JSON.")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--output", help="write the results as JSON to this file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.accuracy import format_table, score, with_average, write_json

    job = scoring_setup(args)
    results = with_average(score(job.model, job.encoder, job.examples, batch_size=job.batch_size,
                                 max_len=job.encoder.cutoff_len))
    print(format_table(results, title=f"adapter: {job.adapter or 'none (base model)'}"))
    if args.output:
        write_json(args.output, {"adapter": job.adapter, "results": results})
        print(f"results written to {args.output}")
    return 0
