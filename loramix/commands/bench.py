"""``loramix bench``: time a training step and an inference forward, and measure a training step's peak
memory, for HF PEFT LoRA, the MixLoRA fast path and the per-expert reference, in one process; prints JSON
with the ratios to PEFT LoRA."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import LoramixError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..tools.bench import VARIANTS, BenchShape

    default = BenchShape()
    p = subparsers.add_parser("bench", help="MixLoRA against PEFT LoRA: step time, inference time, peak memory",
                              description=__doc__)
    for name, help_text in (("hidden", "hidden size"), ("ffn", "FFN (intermediate) size"), ("layers", "decoder layers"),
                            ("vocab", "vocabulary size"), ("heads", "attention heads"), ("batch", "sequences per batch"),
                            ("seq", "tokens per sequence"), ("experts", "experts per layer"),
                            ("top_k", "experts per token"), ("rank", "LoRA rank r (alpha = 2r)")):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=getattr(default, name),
                       help=f"{help_text} (default {getattr(default, name)})")
    p.add_argument("--dropout", type=float, default=default.dropout,
                   help=f"LoRA dropout of every variant (default {default.dropout})")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; 0 keeps torch's choice)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per variant (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions per variant first (default 2)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default) or this process's CPU time, steadier on a shared machine")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="base model dtype (default fp32)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="run every variant through torch.compile")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table of one training step per variant to stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..tools.bench import VARIANTS, BenchShape, run_benchmark

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    for variant in variants:
        if variant not in VARIANTS:
            raise LoramixError(f"--variants: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise LoramixError(f"--device {args.device}: no CUDA device is available")
    for name in ("hidden", "ffn", "layers", "vocab", "heads", "batch", "seq", "experts", "top_k", "rank", "reps"):
        if getattr(args, name) < 1:
            raise LoramixError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden % args.heads:
        raise LoramixError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    shape = BenchShape(hidden=args.hidden, ffn=args.ffn, layers=args.layers, vocab=args.vocab, heads=args.heads,
                       batch=args.batch, seq=args.seq, experts=args.experts, top_k=args.top_k, rank=args.rank,
                       dropout=args.dropout)
    result = run_benchmark(shape, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]),
                           threads=args.threads or None, reps=args.reps, warmup=args.warmup, variants=variants,
                           clock=args.clock, profile=sys.stderr if args.profile else None, compile=args.compile)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0
