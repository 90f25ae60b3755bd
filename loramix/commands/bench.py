"""``loramix bench``: time a training step, a prefill and KV-cache decoding, and measure a training step's peak
memory, for HF PEFT LoRA and MixLoRA on every dispatch path (and ``auto``), in one process; prints JSON with
the ratios between them. ``--preset`` takes the layer shapes of a real model; ``--dry-run`` prints the
settings (and the path ``auto`` would take) without building anything."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..errors import LoramixError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SHAPE_FLAGS = (
    ("hidden", "hidden size"), ("ffn", "FFN (intermediate) size"), ("layers", "decoder layers"),
    ("vocab", "vocabulary size"), ("heads", "attention heads"), ("kv_heads", "key/value heads (None: --heads)"),
    ("batch", "sequences per batch"), ("seq", "tokens per sequence"), ("decode_batch", "prompts decoded at once"),
    ("decode_prompt", "tokens per decoding prompt"), ("new_tokens", "tokens generated per prompt, 0: no decoding"),
    ("experts", "experts per layer"), ("top_k", "experts per token"), ("rank", "LoRA rank r (alpha = 2r)"))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..tools.bench import MODEL_TYPES, PRESETS, VARIANTS, BenchShape

    default = BenchShape()
    p = subparsers.add_parser("bench", help="MixLoRA against PEFT LoRA: step, prefill and decode time, peak memory",
                              description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a real model's layer shapes (hidden, FFN, heads, KV heads, vocab; 4 layers); the shape "
                        "flags below override single values")
    for name, help_text in SHAPE_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int,
                       help=f"{help_text} (default {getattr(default, name)})")
    p.add_argument("--model-type", choices=MODEL_TYPES, help=f"decoder family (default {default.model_type})")
    p.add_argument("--dropout", type=float, help=f"LoRA dropout of every variant (default {default.dropout})")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; 0 keeps torch's choice)")
    p.add_argument("--reps", type=int, default=10, help="timed training steps and prefills per variant (default 10)")
    p.add_argument("--decode-reps", type=int, default=3, help="timed generate calls per variant (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions per variant first (default 2)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default) or this process's CPU time, steadier on a shared machine")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="base model dtype (default fp32)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--compile", action="store_true",
                   help="MixLoRA's FFN activation (the elementwise pair work) through torch.compile")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table of one training step per variant to stderr")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved shape, variants and the path auto takes, and build nothing")
    p.set_defaults(run=run)


def resolve_shape(args: argparse.Namespace):
    """The BenchShape: its defaults, then the preset's values, then every shape flag given."""
    from ..tools.bench import PRESETS, BenchShape

    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(BenchShape)
             if getattr(args, field.name, None) is not None}
    return BenchShape(**{**PRESETS.get(args.preset, {}), **given})


def check(args: argparse.Namespace, shape, variants: tuple[str, ...]) -> None:
    """One-line errors for every bad flag, before anything is built."""
    import torch

    from ..tools.bench import VARIANTS

    for variant in variants:
        if variant not in VARIANTS:
            raise LoramixError(f"--variants: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise LoramixError(f"--device {args.device}: no CUDA device is available")
    for name in ("hidden", "ffn", "layers", "vocab", "heads", "batch", "seq", "decode_batch", "decode_prompt",
                 "experts", "top_k", "rank"):
        if getattr(shape, name) < 1:
            raise LoramixError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(shape, name)}")
    for name in ("reps", "decode_reps"):
        if getattr(args, name) < 1:
            raise LoramixError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if shape.new_tokens < 0:
        raise LoramixError(f"--new-tokens must be >= 0, got {shape.new_tokens}")
    if shape.hidden % shape.heads:
        raise LoramixError(f"--hidden ({shape.hidden}) must be a multiple of --heads ({shape.heads})")
    if shape.kv_heads is not None and (shape.kv_heads < 1 or shape.heads % shape.kv_heads):
        raise LoramixError(f"--kv-heads ({shape.kv_heads}) must divide --heads ({shape.heads})")
    if shape.top_k > shape.experts:
        raise LoramixError(f"--top-k ({shape.top_k}) must be at most --experts ({shape.experts})")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..tools.bench import auto_choice, run_benchmark

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    shape = resolve_shape(args)
    check(args, shape, variants)
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.dry_run:
        result = {"shape": dataclasses.asdict(shape), "preset": args.preset, "variants": list(variants),
                  "device": args.device, "dtype": DTYPES[args.dtype],
                  "auto": auto_choice(shape, device=args.device, dtype=dtype)}
    else:
        result = run_benchmark(shape, device=args.device, dtype=dtype, threads=args.threads or None, reps=args.reps,
                               warmup=args.warmup, decode_reps=args.decode_reps, variants=variants,
                               clock=args.clock, profile=sys.stderr if args.profile else None, compile=args.compile)
        result["preset"] = args.preset
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0
