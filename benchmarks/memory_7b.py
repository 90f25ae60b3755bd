"""Training memory at LLaMA-2-7B widths (hidden 4096, FFN 11008, 32 heads), bf16, per variant, on any device.

    python benchmarks/memory_7b.py saved [--output FILE]   # bytes autograd keeps per token and decoder layer
    python benchmarks/memory_7b.py peak  [--layers 4] [--output FILE]   # peak training-step memory at 4 x 512

``saved`` counts the storages a saved-tensor hook sees (``loramix.tools.bench.saved_bytes``) in a one- and a
two-layer model on 16 tokens: the difference is one layer, exact and independent of the token count.
``peak`` is the allocator-level peak of one training step (``peak_step_bytes``) of a ``--layers`` model (4,
as the presets) at the batch of the GPU table. Both run on CPU in minutes; neither needs a GPU.
"""
from __future__ import annotations

import argparse
import gc
import json

import torch

from loramix.tools.bench import (BenchShape, build_base, build_variant, make_batch, peak_step_bytes, random_ids,
                                 resident_bytes, saved_bytes, train_step)

WIDTHS = dict(hidden=4096, ffn=11008, heads=32, kv_heads=32)
VARIANTS = ("peft-lora", "mixlora-grouped_mm", "mixlora-grouped", "mixlora-dense")


def variant(name: str, shape: BenchShape, device: str) -> torch.nn.Module:
    return build_variant(name, build_base(shape, device=device, dtype=torch.bfloat16), shape).train()


def saved_per_token_and_layer(device: str) -> dict[str, float]:
    tokens = random_ids(2, 8, 1000, device=device, seed=0)
    out = {}
    for dropout in (0.05, 0.0):
        for name in VARIANTS:
            counts = []
            for layers in (1, 2):
                model = variant(name, BenchShape(**WIDTHS, vocab=1000, layers=layers, dropout=dropout), device)
                counts.append(saved_bytes(model, tokens))
                del model
                gc.collect()
            out[f"{name}, dropout {dropout}"] = (counts[1] - counts[0]) / tokens.numel()
            print(f"{name}, dropout {dropout}: {out[f'{name}, dropout {dropout}']:.0f} bytes", flush=True)
    return out


def peak_step(device: str, layers: int) -> dict[str, dict[str, float]]:
    shape = BenchShape(**WIDTHS, vocab=32000, layers=layers, batch=4, seq=512)
    batch = make_batch(shape, device=device)
    out = {}
    for name in VARIANTS[:3]:  # dense's 4-5x activations are known from `saved`
        model = variant(name, shape, device)
        extra = peak_step_bytes(model, train_step, batch, device=device)
        out[name] = {"peak_step_extra_mb": extra / 2**20,
                     "peak_step_total_mb": (extra + resident_bytes(model)) / 2**20}
        print(name, out[name], flush=True)
        del model
        gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("saved", "peak"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the peak run (default 4)")
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = saved_per_token_and_layer(args.device) if args.what == "saved" else peak_step(args.device, args.layers)
    result = {"what": args.what, "widths": WIDTHS, "layers": None if args.what == "saved" else args.layers,
              "dtype": "bfloat16", "device": args.device, "torch": torch.__version__, "results": results}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
