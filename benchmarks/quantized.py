"""Training-step time of MixLoRA on a 4-bit / 8-bit base as a ratio to a bf16 base, same weights, batch and process.

    python benchmarks/quantized.py [--threads 2] [--repeats 7] [--clock wall|cpu] [--device cpu] [--hidden 512 ...]

One randomly initialised LLaMA (loramix bench's default shape) is saved once and loaded as each base: bf16,
fp32, NF4 and FP4 computing in bf16 (NF4 also with double quantisation, and computing in fp32) and LLM.int8,
through loramix's own loader (transformers' BitsAndBytesConfig); bf16 and NF4 with double quantisation also
with gradient checkpointing (the recipe of docs/quantization.md). Each gets the same MixLoRA adapter (E=8, k=2,
r=16, all seven projections, the grouped path); the models take turns step by step, the order rotating from
one repetition to the next, so machine noise hits them alike (``--clock cpu``: the process's CPU time, which
does not count waiting for a core on a shared machine). A step is forward with labels and backward, gradients
dropped. Prints one JSON object: median seconds per step, the ratio to bf16, and each base's stored bytes
against loramix.tools.memory's planner.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from loramix import MixLoraConfig, get_mixlora_model
from loramix.io.base_model import load_base_model
from loramix.runconfig import ModelSpec
from loramix.tools.bench import BenchShape, build_base
from loramix.tools.memory import Shape, frozen_weight_bytes, stored_bytes

BASES = {
    "bf16": dict(dtype="bfloat16"),
    "fp32": dict(dtype="float32"),
    "nf4 bf16": dict(dtype="bfloat16", quantization="nf4"),
    "nf4+dq bf16": dict(dtype="bfloat16", quantization="nf4", double_quant=True),
    "nf4 fp32": dict(dtype="float32", quantization="nf4"),
    "fp4 bf16": dict(dtype="bfloat16", quantization="fp4"),
    "int8 bf16": dict(dtype="bfloat16", quantization="int8"),
    "bf16 checkpointing": dict(dtype="bfloat16"),
    "nf4+dq bf16 checkpointing": dict(dtype="bfloat16", quantization="nf4", double_quant=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="steps per base; the first two are warm-up")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--device", default="cpu")
    for name in ("hidden", "ffn", "layers", "vocab", "heads", "batch", "seq"):
        parser.add_argument(f"--{name}", type=int, default=getattr(BenchShape(), name))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = BenchShape(**{k: getattr(args, k) for k in ("hidden", "ffn", "layers", "vocab", "heads", "batch", "seq")})
    ids = torch.randint(3, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    adapter = MixLoraConfig(r=shape.rank, lora_alpha=shape.alpha, lora_dropout=shape.dropout,
                            num_experts=shape.experts, top_k=shape.top_k)
    models, memory = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        base = build_base(shape, device="cpu", dtype=torch.float32)
        base.save_pretrained(folder)
        planner_shape = Shape.from_hf_config(base.config)
        del base
        for name, spec in BASES.items():
            base = load_base_model(ModelSpec(name_or_path=folder, **spec), args.device).to(args.device)
            planned = frozen_weight_bytes(planner_shape, quantization=spec.get("quantization"),
                                          double_quant=spec.get("double_quant", False),
                                          weight_bytes=2 if spec["dtype"] == "bfloat16" else 4)
            memory[name] = {"stored_mib": round(stored_bytes(base) / 2**20, 2), "planner_mib": round(planned / 2**20, 2)}
            torch.manual_seed(1)
            models[name] = get_mixlora_model(base, adapter).train()
            if name.endswith("checkpointing"):
                models[name].gradient_checkpointing_enable()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            start = clock()
            models[name](input_ids=ids, labels=ids).loss.backward()
            if args.device != "cpu":
                torch.cuda.synchronize()
            times[name].append(clock() - start)
            models[name].zero_grad(set_to_none=True)
    median = {name: statistics.median(t[2:]) for name, t in times.items()}
    print(json.dumps({
        "shape": f"llama hidden {shape.hidden}, ffn {shape.ffn}, {shape.layers} layers, vocab {shape.vocab}, "
                 f"batch {shape.batch}x{shape.seq}, E={shape.experts}, k={shape.top_k}, r={shape.rank}",
        "device": args.device, "threads": args.threads, "clock": args.clock, "seconds": {k: round(v, 4) for k, v in median.items()},
        "ratio_to_bf16": {k: round(v / median["bf16"], 3) for k, v in median.items()},
        "base_memory": memory}, indent=2))


if __name__ == "__main__":
    main()
