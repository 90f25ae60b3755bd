"""``loramix merge``: fold a MixLoRA adapter into a dense model: everything (single-expert adapters) or the
attention LoRAs only (the experts and routers stay, as a smaller adapter beside the merged model)."""
from __future__ import annotations

import argparse

from .export import add_output_args, load_mixlora


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="fold a MixLoRA adapter's LoRAs into the base weights",
                              description=__doc__)
    add_output_args(p)
    p.add_argument("--attention-only", action="store_true",
                   help="fold only the attention LoRAs; write the experts and routers to OUT/adapter")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..convert.merge import merge_adapter

    model, dtype, tokenizer = load_mixlora(args)
    summary = merge_adapter(model, args.output_dir, what="attention" if args.attention_only else "all",
                            dtype=dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                            tokenizer=tokenizer)
    print(summary.report())
    return 0
