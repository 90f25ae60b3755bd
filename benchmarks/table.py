"""Markdown rows of ratios to PEFT LoRA from ``loramix bench`` JSON files.

    python benchmarks/table.py benchmarks/results/gpu/*.json

One row per file and MixLoRA variant: training step, prefill and peak step memory as multiples of PEFT
LoRA's (lower is better), decode tokens/s as a multiple of PEFT LoRA's (higher is better), and PEFT
LoRA's own figures on its row.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

BASELINE = "peft-lora"


def rows(path: Path) -> list[str]:
    result = json.loads(path.read_text())
    shape = result["shape"]
    where = f"{result.get('preset') or 'custom'} {shape['batch']}x{shape['seq']} {result['dtype']}"
    base = result["results"][BASELINE]
    decode = f"{base['decode_tokens_per_s']:.0f} tok/s" if base["decode_tokens_per_s"] else "-"
    out = [f"| {where} | {BASELINE} | {base['train_step_s'] * 1e3:.1f} ms | {base['prefill_s'] * 1e3:.1f} ms | "
           f"{decode} | {base['peak_step_total_mb']:.0f} MB |"]
    for name, res in result["results"].items():
        if name == BASELINE:
            continue
        ratio = res["ratio_to"][BASELINE]
        cells = [f"{ratio[key]:.2f}x" if key in ratio else "-"
                 for key in ("train_step", "prefill", "decode_tokens_per_s", "peak_step_total")]
        label = f"{name} ({result['auto']})" if name == "mixlora-auto" else name
        out.append(f"| | {label} | " + " | ".join(cells) + " |")
    return out


def main(paths: list[str]) -> None:
    print("| run | variant | train step | prefill | decode | peak step memory |")
    print("|---|---|---|---|---|---|")
    for path in paths:
        print("\n".join(rows(Path(path))))


if __name__ == "__main__":
    main(sys.argv[1:])
