"""Training-step time of each variant as a ratio to top-2 MixLoRA, same model, batch and process (CPU, fp32).

    python benchmarks/variants.py [--threads 2] [--repeats 7]

Prints one JSON object: median seconds per step and the ratio to top-2 MixLoRA for top-p, switch, MixDoRA
and HF PEFT LoRA/DoRA at the same r. The models take turns, so machine noise hits them alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loramix import MixLoraConfig
from loramix.training.methods import MethodSpec, build_model

CASES = {
    "mixlora top-2": MethodSpec("mixlora", MixLoraConfig(r=16, num_experts=8, top_k=2, lora_dropout=0.0)),
    "mixlora top-p 0.8": MethodSpec("mixlora", MixLoraConfig(r=16, num_experts=8, routing="top_p", lora_dropout=0.0)),
    "mixlora switch": MethodSpec("mixlora", MixLoraConfig(r=16, num_experts=8, routing="switch", lora_dropout=0.0)),
    "mixdora top-2": MethodSpec("mixdora", MixLoraConfig(r=16, num_experts=8, top_k=2, lora_dropout=0.0)),
    "peft lora": MethodSpec("lora", MixLoraConfig(r=16, lora_dropout=0.0), 16),
    "peft dora": MethodSpec("dora", MixLoraConfig(r=16, lora_dropout=0.0), 16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="steps per model; the first two are warm-up")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, vocab_size=2000,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ids = torch.randint(3, 2000, (4, 128), generator=torch.Generator().manual_seed(0))
    models = {}
    for name, spec in CASES.items():
        torch.manual_seed(0)
        models[name] = build_model(AutoModelForCausalLM.from_config(hf), spec).train()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    median = {name: statistics.median(t[2:]) for name, t in times.items()}
    base = median["mixlora top-2"]
    print(json.dumps({"shape": "llama hidden 256, ffn 688, 2 layers, batch 4x128, E=8, r=16", "threads": args.threads,
                      "seconds": {k: round(v, 4) for k, v in median.items()},
                      "ratio_to_mixlora_top2": {k: round(v / base, 3) for k, v in median.items()}}, indent=2))


if __name__ == "__main__":
    main()
